"""The quickstart page runs: its ```python blocks execute in order in one namespace.

The blocks carry their own asserts (loss goes down, reload matches, generation matches). Each
block is compiled at its own line of docs/quickstart.md, so a traceback points into the page.
The site itself is built with warnings as errors by `make docs` (part of `make test`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first code line number, code) of every ```python block, in order."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the page's bundle lands in tmp_path
    blocks = python_blocks(QUICKSTART)
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "quickstart"}
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, str(QUICKSTART), "exec"), namespace)
    assert "again" in namespace and "tokens" in namespace
