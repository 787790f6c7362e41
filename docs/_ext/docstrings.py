"""Griffe extension: a dataclass or pydantic field's help text becomes its docstring.

``MoPEConfig`` documents each field with ``field(metadata={"help": ...})`` (PEFT's convention) and
the recipe schema with ``Field(description=...)``; mkdocstrings shows neither by itself. This reads
them statically (no import of torch), so the API reference lists every field with its help and
its default instead of the raw ``field(...)`` call.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError):
        return None


class FieldHelp(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        call = getattr(node, "value", None)
        if not isinstance(call, ast.Call) or getattr(call.func, "id", None) not in ("field", "Field"):
            return
        keywords = {kw.arg: kw.value for kw in call.keywords}
        help_text = None
        if isinstance(keywords.get("metadata"), ast.Dict):
            meta = keywords["metadata"]
            help_text = next(
                (_literal(v) for k, v in zip(meta.keys, meta.values, strict=True) if _literal(k) == "help"), None
            )
        if "description" in keywords:
            help_text = _literal(keywords["description"])
        if help_text and attr.docstring is None:
            attr.docstring = griffe.Docstring(help_text, parent=attr)
        default = keywords.get("default", call.args[0] if call.args else None)
        if "default_factory" in keywords:
            attr.value = f"{ast.unparse(keywords['default_factory'])}()"
        elif default is not None:
            attr.value = (
                "required" if isinstance(default, ast.Constant) and default.value is ... else ast.unparse(default)
            )
