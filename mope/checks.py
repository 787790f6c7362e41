"""The checks of configuration fields: one definition of "an integer", "a number", "a choice".

Every ``MoPEConfig`` field is validated through these functions (in ``mope.config``, in
``mope.routing.options`` and in each gate's ``Router.check_options``), so all fields agree on
what they accept: a bool is never an integer or a number, and a number is always finite and within
float32's range (NaN, ±inf and 1e39 are refused; ``json`` reads ``NaN`` and ``Infinity`` from a hand-edited ``adapter_config.json``).
Each raises ``ValueError`` naming the field as ``"<owner>.<name> must be <what>, got <repr>"`` and
returns the value it accepted.
"""

from __future__ import annotations

import math
import types
from collections.abc import Collection, Mapping
from typing import Any, TypeVar, Union, get_args, get_origin

from packaging.version import InvalidVersion, Version

T = TypeVar("T")


def fail(owner: str, name: str, wanted: str, value: Any) -> None:
    """Raise the ValueError every check raises: the field, what it must be, and what it got."""
    raise ValueError(f"{owner}.{name} must be {wanted}, got {value!r}")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The largest float32: a field beyond it (lora_alpha=1e39) is inf in the tensors it scales.
FLOAT32_MAX = 3.4028234663852886e38


def is_finite(value: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return isinstance(value, int) or math.isfinite(value)  # isfinite(10**400) would overflow: ints are finite


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``, within float32's range."""
    return is_finite(value) and abs(value) <= FLOAT32_MAX


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``' > 0'``, ``' <= 1'``, ``' in [0, 1)'`` or ``''`` (no bound)."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def in_range(
    value: float, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_int(
    owner: str,
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    optional: bool = False,
    why: str = "",
) -> int | None:
    """An integer (not a bool) in ``[low, high]`` (either bound may be None); None too if ``optional``.

    ``why`` is appended to what the field must be, e.g. ``"with routing_level='task'"``.
    """
    if optional and value is None:
        return None
    if not is_int(value) or not in_range(value, low, high):
        wanted = ("None or " if optional else "") + "an integer" + describe_range(low, high)
        fail(owner, name, f"{wanted} {why}".rstrip(), value)
    return value


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    why: str = "",
) -> float | None:
    """A finite int or float (not a bool, never NaN or ±inf) between ``low`` and ``high``.

    Bounds are inclusive unless ``low_open`` / ``high_open``; either may be None. None is
    accepted too if ``optional``.
    """
    if optional and value is None:
        return None
    if not is_number(value) or not in_range(value, low, high, low_open, high_open):
        beyond_float32 = is_finite(value) and not is_number(value)
        finite = "a finite number" + (" within float32's range (3.4e38)" if beyond_float32 else "")
        wanted = ("None or " if optional else "") + finite + describe_range(low, high, low_open, high_open)
        fail(owner, name, f"{wanted} {why}".rstrip(), value)
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        fail(owner, name, "True or False", value)
    return value


def check_choice(owner: str, name: str, value: T, choices: Collection[Any]) -> T:
    """One of ``choices`` (a registry table's keys, or a sequence); names them, sorted for a table or set."""
    if not isinstance(value, str) or value not in choices:
        listed = sorted(choices) if isinstance(choices, (Mapping, set, frozenset)) else list(choices)
        raise ValueError(f"{owner}.{name}={value!r} is unknown; choose one of {listed}")
    return value


def check_version(owner: str, name: str, value: Any) -> str:
    """A version string that ``packaging.version.Version`` parses (PEP 440, e.g. ``'0.1.0'``)."""
    if not isinstance(value, str):
        fail(owner, name, "a version string such as '0.1.0'", value)
    try:
        Version(value)
    except InvalidVersion:
        fail(owner, name, "a version string such as '0.1.0' (PEP 440)", value)
    return value


# What a ``list[...]`` field accepts: PEFT turns target lists into sets, and a copied config passes them back in.
SEQUENCE_TYPES = (list, tuple, set, frozenset)
TYPE_NAMES = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a finite number", "numbers")}


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint: ``None``, ``str``, ``int`` (not a bool), ``float`` (finite, an int
    too), ``bool``, a class, ``list[X]`` (any list, tuple or set of X), ``dict[K, V]`` or a union of these."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches_type(value, arg) for arg in args)
    if origin is list or hint is list:
        return isinstance(value, SEQUENCE_TYPES) and all(matches_type(item, args[0]) for item in value if args)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches_type(key, args[0]) and matches_type(item, args[1]) for key, item in value.items()
        )
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    return isinstance(value, hint)


def describe_type(hint: Any, plural: bool = False) -> str:
    """``list[str] | str | None`` -> ``'a list of strings, a string or None'``; for messages."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is None or hint is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        parts = [describe_type(arg) for arg in args]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is list:
        return f"a list of {describe_type(args[0], plural=True)}"
    if origin is dict:
        return f"a dict of {describe_type(args[0], plural=True)} to {describe_type(args[1], plural=True)}"
    if hint in TYPE_NAMES:
        return TYPE_NAMES[hint][plural]
    if hint is bool:
        return "True or False values" if plural else "True or False"
    name = getattr(hint, "__name__", str(hint))
    return f"{name} values" if plural else f"a {name}"


def check_type(owner: str, name: str, value: Any, hint: Any) -> Any:
    """A value of the type ``hint`` names (see :func:`matches_type`): the one check of string and container fields.

    A wrong type would otherwise reach PEFT or torch and fail there with a message that names no field
    (``target_modules=5``: "'int' object is not iterable"), or pass silently (a string where PEFT expects a list
    of names is matched one character at a time).
    """
    if not matches_type(value, hint):
        fail(owner, name, describe_type(hint), value)
    return value
