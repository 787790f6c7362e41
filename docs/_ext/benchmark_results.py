"""MkDocs hook: the page docs/benchmarks.md shows every committed benchmarks/results/*.md.

The marker line ``<!-- benchmark results -->`` is replaced at build time by each results file,
in name order, under a heading naming the file and the script that wrote it; the files' own
headings move one level down. A new results file shows up without editing the docs. The plots
there (``benchmarks/results/*.png``) are served as ``results/<name>.png``, so a page shows one
with ``![what](results/<name>.png)`` and no copy under docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

MARKER = "<!-- benchmark results -->"
PAGE = "benchmarks.md"
HEADING = re.compile(r"^(#+) ", re.M)


def _demoted(markdown: str) -> str:
    """Every heading one level down, except inside fenced code blocks."""
    parts = re.split(r"(^```.*?^```$)", markdown, flags=re.M | re.S)
    return "".join(p if p.startswith("```") else HEADING.sub(r"#\1 ", p) for p in parts)


def on_files(files, config):
    """Each committed plot under benchmarks/results/ as the site file results/<name>.png."""
    root = Path(config.config_file_path).parent / "benchmarks" / "results"
    for plot in sorted(root.glob("*.png")):
        files.append(File.generated(config, f"results/{plot.name}", abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    root = Path(config.config_file_path).parent / "benchmarks"
    results = sorted((root / "results").glob("*.md"))
    if MARKER not in markdown or not results:
        raise ValueError(f"{PAGE}: needs the line {MARKER!r} and files in {root / 'results'}")
    scripts = sorted(root.glob("*.py"), key=lambda p: -len(p.stem))
    sections = []
    for path in results:
        script = next((s for s in scripts if path.stem.startswith(s.stem)), None)
        source = f"`benchmarks/results/{path.name}`" + (f", written by `benchmarks/{script.name}`" if script else "")
        sections.append(f"## {path.stem}\n\nFrom {source}.\n\n{_demoted(path.read_text())}")
    return markdown.replace(MARKER, "\n\n".join(sections))
