"""The ``mope`` command (``[project.scripts] mope = "mope.cli:main"``); needs the ``cli`` extra.

The commands themselves are in :mod:`mope.cli.app`; this entry point only checks that the
extra is installed, so that a core-only install prints the line that adds it.
"""

from __future__ import annotations

import sys

from ..extras import require_extra


def main() -> None:
    """Console-script entry point: run the typer app, or say which extra is missing."""
    try:
        require_extra("cli", "typer", "rich")
        from .app import app
    except ImportError as error:
        sys.exit(f"mope: {error}")
    app()
