"""The checks of configuration fields: one definition of "an integer", "a number", "a choice".

Every ``MoPEConfig`` field is validated through these functions (in ``mope.config``, in
``mope.routing.options`` and in each gate's ``Router.check_options``), so all fields agree on
what they accept: a bool is never an integer or a number, and a number is always finite (NaN and
±inf are refused; ``json`` reads ``NaN`` and ``Infinity`` from a hand-edited ``adapter_config.json``).
Each raises ``ValueError`` naming the field as ``"<owner>.<name> must be <what>, got <repr>"`` and
returns the value it accepted.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from packaging.version import InvalidVersion, Version

T = TypeVar("T")


def fail(owner: str, name: str, wanted: str, value: Any) -> None:
    """Raise the ValueError every check raises: the field, what it must be, and what it got."""
    raise ValueError(f"{owner}.{name} must be {wanted}, got {value!r}")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return isinstance(value, int) or math.isfinite(value)  # isfinite(10**400) would overflow: ints are finite


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
        wanted = ("None or " if optional else "") + "a finite number" + describe_range(low, high, low_open, high_open)
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
