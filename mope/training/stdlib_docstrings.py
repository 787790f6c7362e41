"""A real-text, multi-domain classification task that needs no download.

Docstrings of Python's standard library (functions, classes, methods), labelled by the package
family they come from. Sources are parsed with ``ast`` (nothing is imported). The build is
deterministic for a given Python version: files and docstrings are sorted, duplicates that
occur under two families are dropped, each family is capped at ``per_label`` examples, and the
train/eval split is fixed by a hash of the text.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from collections import defaultdict

# label -> top-level stdlib packages. Chosen to exist on Python 3.10-3.13 with many docstrings.
FAMILIES: dict[str, tuple[str, ...]] = {
    "gui": ("tkinter",),
    "ide": ("idlelib",),
    "async": ("asyncio", "concurrent"),
    "imports": ("importlib",),
    "email": ("email",),
    "logging": ("logging",),
    "xml": ("xml",),
    "processes": ("multiprocessing",),
    "testing": ("unittest",),
    "web": ("http", "urllib", "wsgiref", "xmlrpc"),
}

# A second, finer task: modules within three domains (concurrency, the web, XML), whose docstrings
# share much vocabulary. Used by the defaults study to check that what pays on FAMILIES holds elsewhere.
MODULES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "concurrent": ("concurrent",),
    "multiprocessing": ("multiprocessing",),
    "http": ("http",),
    "urllib": ("urllib",),
    "xmlrpc": ("xmlrpc",),
    "wsgiref": ("wsgiref",),
    "xml.dom": ("xml/dom",),
    "xml.etree": ("xml/etree",),
    "xml.sax": ("xml/sax",),
}


def first_paragraph(docstring: str, max_chars: int = 300) -> str:
    text = docstring.strip().split("\n\n")[0]
    return " ".join(text.split())[:max_chars]


@functools.cache  # a process that trains several runs (the defaults study's workers) parses each file once
def docstrings_of(path: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, OSError):
        return ()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.strip()) >= 30:
                found.append(first_paragraph(doc))
    return tuple(found)


def package_files(root: str, package: str) -> list[str]:
    files = []
    for folder, dirs, names in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("test") and d != "__pycache__")
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def is_eval(text: str, eval_fraction: float) -> bool:
    bucket = int(hashlib.sha1(b"split:" + text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < eval_fraction


def build(
    per_label: int = 160, eval_fraction: float = 0.25, families: dict[str, tuple[str, ...]] = FAMILIES
) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` lists of ``{"text", "label"}``; labels are the keys of ``families``."""
    root = sysconfig.get_paths()["stdlib"]
    by_label: dict[str, list[str]] = {}
    owners: dict[str, set[str]] = defaultdict(set)
    for label, packages in families.items():
        texts = sorted({t for p in packages for f in package_files(root, p) for t in docstrings_of(f)})
        by_label[label] = texts
        for text in texts:
            owners[text].add(label)
    missing = [label for label, texts in by_label.items() if not texts]
    if missing:  # a smaller task without a word: the H100 defaults study ran 8-way where the CPU's was 10-way
        packages = sorted(p for label in missing for p in families[label])
        raise ValueError(
            f"builtin stdlib task: this Python's standard library ({root}) has no docstrings for label(s) {missing} "
            f"(packages {packages}); Debian and Ubuntu ship tkinter and idlelib separately (apt-get install "
            "python3-tk idle-python3.X): install them, or use a task whose packages are there"
        )
    train, held_out = [], []
    for label, texts in by_label.items():
        unique = [t for t in texts if len(owners[t]) == 1]
        unique.sort(key=lambda t: hashlib.sha1(b"pick:" + t.encode()).hexdigest())
        for text in unique[:per_label]:
            (held_out if is_eval(text, eval_fraction) else train).append({"text": text, "label": label})
    return train, held_out
