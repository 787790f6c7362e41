"""Griffe extension: what mkdocstrings would otherwise miss or garble in mope's docstrings.

- A dataclass or pydantic field's help text becomes its docstring. ``MoPEConfig`` documents each
  field with ``field(metadata={"help": ...})`` (PEFT's convention) and the recipe schema with
  ``Field(description=...)``; mkdocstrings shows neither by itself. They are read statically (no
  torch import), and the field's default replaces the raw ``field(...)`` call as its value.
- Sphinx roles (``:func:`x```, ``:class:`~a.b```) become plain code spans: the docstrings are
  written for ``help()`` as much as for this site.
"""

from __future__ import annotations

import ast
import html
import re
from typing import Any

import griffe

SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`~?([^`]+)`")


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError):
        return None


def _plain(text: str) -> str:
    """Plain text as Markdown: "<python package>" is no HTML tag, "a * b * c" no emphasis."""
    return html.escape(text, quote=False).replace("*", r"\*")


def _markdown(node: ast.expr) -> str | None:
    """A help string as Markdown; an f-string's fields (read at import time) show as code."""
    if isinstance(node, ast.JoinedStr):
        parts = [_plain(p.value) if isinstance(p, ast.Constant) else f"`{ast.unparse(p.value)}`" for p in node.values]
        return "".join(parts)
    text = _literal(node)
    return _plain(text) if isinstance(text, str) else None


def _help_of(call: ast.Call) -> str | None:
    keywords = {kw.arg: kw.value for kw in call.keywords}
    if "description" in keywords:
        return _markdown(keywords["description"])
    meta = keywords.get("metadata")
    if isinstance(meta, ast.Dict):
        return next((_markdown(v) for k, v in zip(meta.keys, meta.values, strict=True) if _literal(k) == "help"), None)
    return None


def _default_of(call: ast.Call) -> str | None:
    keywords = {kw.arg: kw.value for kw in call.keywords}
    if "default_factory" in keywords:
        return f"{ast.unparse(keywords['default_factory'])}()"
    default = keywords.get("default", call.args[0] if call.args else None)
    if isinstance(default, ast.Constant) and default.value is ...:
        return "required"
    return None if default is None else ast.unparse(default)


class MopeDocstrings(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        call = getattr(node, "value", None)
        if not isinstance(call, ast.Call) or getattr(call.func, "id", None) not in ("field", "Field"):
            return
        help_text = _help_of(call)
        if help_text and attr.docstring is None:
            attr.docstring = griffe.Docstring(help_text, parent=attr)
        attr.value = _default_of(call) or attr.value

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = SPHINX_ROLE.sub(r"`\1`", obj.docstring.value)
