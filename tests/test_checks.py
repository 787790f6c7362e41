"""mope.checks: the one set of field checks (integers, finite numbers, booleans, choices, versions) and their messages."""

from __future__ import annotations

import math
import re

import pytest

from mope.checks import check_bool, check_choice, check_int, check_number, check_version


def test_check_int_takes_integers_in_range_only():
    assert check_int("C", "n", 3, low=1, high=3) == 3
    assert check_int("C", "n", None, low=1, optional=True) is None
    assert check_int("C", "n", 10**400, low=0) == 10**400
    for bad in (0, 4, True, 2.0, "2", None, math.nan):
        with pytest.raises(ValueError, match=r"^C\.n must be an integer in \[1, 3\], got "):
            check_int("C", "n", bad, low=1, high=3)
    with pytest.raises(ValueError, match=r"^C\.n must be None or an integer >= 1 with x, got 0$"):
        check_int("C", "n", 0, low=1, optional=True, why="with x")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "1", None])
def test_check_number_refuses_non_finite_bools_and_strings(bad):
    with pytest.raises(ValueError, match=r"^C\.x must be a finite number, got "):
        check_number("C", "x", bad)


def test_check_number_bounds_open_and_closed():
    assert check_number("C", "x", 0, low=0) == 0
    assert check_number("C", "x", 1.0, low=0, high=1, low_open=True) == 1.0
    assert check_number("C", "x", 10**30, low=0) == 10**30  # an int: no isfinite (it overflows past 1e308)
    assert check_number("C", "x", None, optional=True) is None
    cases = [
        ({"low": 0, "low_open": True}, 0, r"a finite number > 0"),
        ({"low": 0}, -0.5, r"a finite number >= 0"),
        ({"high": 1, "high_open": True}, 1, r"a finite number < 1"),
        ({"low": 0, "high": 1, "high_open": True}, 1.0, r"a finite number in \[0, 1\)"),
        ({"low": 0, "high": 1, "low_open": True}, 0.0, r"a finite number in \(0, 1\]"),
        ({"low": 0.01, "why": "(clamped)"}, 0.001, r"a finite number >= 0\.01 \(clamped\)"),
        ({"low": 0, "optional": True}, math.inf, r"None or a finite number >= 0"),
        # finite in Python, inf in the float32 tensors it scales (lora_alpha=1e39 failed at the first forward)
        ({"low": 0}, 1e39, r"a finite number within float32's range \(3\.4e38\) >= 0"),
        ({}, -(10**400), r"a finite number within float32's range \(3\.4e38\)"),
    ]
    for kwargs, value, wanted in cases:
        with pytest.raises(ValueError, match=rf"^C\.x must be {wanted}, got {re.escape(repr(value))}$"):
            check_number("C", "x", value, **kwargs)


def test_check_bool_choice_and_version():
    assert check_bool("C", "b", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(ValueError, match=r"^C\.b must be True or False, got "):
            check_bool("C", "b", bad)
    assert check_choice("C", "c", "a", {"b": 1, "a": 2}) == "a"
    with pytest.raises(ValueError, match=re.escape("C.c='z' is unknown; choose one of ['a', 'b']")):
        check_choice("C", "c", "z", {"b": 1, "a": 2})  # a table's keys are listed sorted
    with pytest.raises(ValueError, match=re.escape("C.c=['a'] is unknown; choose one of ['b', 'a']")):
        check_choice("C", "c", ["a"], ("b", "a"))  # a sequence in its order; unhashable values are refused too
    assert check_version("C", "v", "0.1.0") == "0.1.0"
    for bad in ("banana", "", 1, None):
        with pytest.raises(ValueError, match=r"^C\.v must be a version string such as '0\.1\.0'"):
            check_version("C", "v", bad)
