"""Optional dependencies: the tools (training loop, CLI, plots) check theirs on import.

The core (``import mope``, wrapping, saving, loading) needs only torch, peft, transformers and
safetensors. A tool whose extra is not installed fails at once with the line that installs it,
not with a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib.util


def require_extra(extra: str, *modules: str) -> None:
    """Raise ImportError naming ``pip install 'mope[extra]'`` if any of ``modules`` is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"this part of mope needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'mope[{extra}]'"
        )
