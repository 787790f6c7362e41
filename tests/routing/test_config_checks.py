"""One numeric check for every config field: ``mope.checks``, and MoPEConfig's numbers refuse NaN and ±inf.

Every numeric field is refused non-finite, whether the value is given in code or arrives through a
hand-edited ``adapter_config.json`` (Python's ``json`` writes and reads ``NaN`` / ``Infinity``), and
the error names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

import mope
from mope.checks import check_bool, check_choice, check_int, check_number, check_version

# --- mope.checks --------------------------------------------------------------------------------


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
    assert check_number("C", "x", 10**400, low=0) == 10**400  # a huge int is finite (isfinite would overflow)
    assert check_number("C", "x", None, optional=True) is None
    cases = [
        ({"low": 0, "low_open": True}, 0, r"a finite number > 0"),
        ({"low": 0}, -0.5, r"a finite number >= 0"),
        ({"high": 1, "high_open": True}, 1, r"a finite number < 1"),
        ({"low": 0, "high": 1, "high_open": True}, 1.0, r"a finite number in \[0, 1\)"),
        ({"low": 0, "high": 1, "low_open": True}, 0.0, r"a finite number in \(0, 1\]"),
        ({"low": 0.01, "why": "(clamped)"}, 0.001, r"a finite number >= 0\.01 \(clamped\)"),
        ({"low": 0, "optional": True}, math.inf, r"None or a finite number >= 0"),
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


# --- every numeric MoPEConfig field -------------------------------------------------------------

# Fields whose default is a number (bools are not); their bad values need no other field set.
NUMERIC_FIELDS = [f.name for f in dataclasses.fields(mope.MoPEConfig) if type(f.default) in (int, float)]
# Numeric fields whose default is None, with what makes them apply.
OPTIONAL_NUMERIC_FIELDS = {
    "capacity_factor": {},
    "num_tasks": {"routing_level": "task"},
    "router_schedule_start_top_k": {"router_schedule_steps": 10},
    "router_schedule_start_temperature": {"router_schedule_steps": 10},
}
ROWS = [(name, {}) for name in NUMERIC_FIELDS] + list(OPTIONAL_NUMERIC_FIELDS.items())
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def test_the_numeric_fields_are_all_listed():
    float_fields = {"lora_alpha", "lora_dropout", "adapter_scaling", "router_jitter", "router_init_std"}
    float_fields |= {"aux_loss_coef", "z_loss_coef", "router_temperature", "top_p", "dselect_gamma"}
    float_fields |= {"cosine_init_temperature", "importance_loss_coef", "entropy_loss_coef"}
    float_fields |= {"localized_balance_coef", "localized_balance_delta"}
    int_fields = {"num_experts", "top_k", "num_shared_experts", "r", "sinkhorn_iterations", "num_groups"}
    int_fields |= {"cosine_dim", "hash_seed", "slots_per_expert", "router_schedule_steps"}
    assert set(NUMERIC_FIELDS) == float_fields | int_fields
    good = {"capacity_factor": 1.0, "num_tasks": 2, "router_schedule_start_top_k": 1}
    good["router_schedule_start_temperature"] = 2.0
    for name, context in OPTIONAL_NUMERIC_FIELDS.items():  # the context makes a finite value valid
        mope.MoPEConfig(**context, **{name: good[name]})


@pytest.mark.parametrize("value", list(NON_FINITE.values()), ids=list(NON_FINITE))
@pytest.mark.parametrize(("field", "context"), ROWS, ids=[row[0] for row in ROWS])
def test_non_finite_numbers_are_refused_naming_the_field(field, context, value):
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field} must be "):
        mope.MoPEConfig(**{**context, field: value})


def write_config(folder, **changes) -> str:
    """A valid adapter_config.json in ``folder`` with ``changes`` written over it by Python's json."""
    mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]).save_pretrained(folder)
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, **changes}))
    return path.read_text()


@pytest.mark.parametrize("value", list(NON_FINITE.values()), ids=list(NON_FINITE))
@pytest.mark.parametrize(("field", "context"), ROWS, ids=[row[0] for row in ROWS])
def test_non_finite_numbers_in_adapter_config_json_are_refused_naming_the_field(tmp_path, field, context, value):
    text = write_config(tmp_path, **context, **{field: value})
    assert {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(value)] in text  # what json writes
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field} must be "):
        mope.MoPEConfig.from_pretrained(str(tmp_path))


def test_mope_version_is_checked_when_the_config_is_built():
    assert mope.MoPEConfig(mope_version="0.0.9").mope_version == "0.0.9"
    for bad in ("banana", 0.1, None):
        with pytest.raises(ValueError, match=r"^MoPEConfig\.mope_version must be a version string such as '0\.1\.0'"):
            mope.MoPEConfig(mope_version=bad)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_mope_version_in_adapter_config_json_is_named(tmp_path, value):
    write_config(tmp_path, mope_version=value)  # the upgrade step reads the version before the config is built
    with pytest.raises(ValueError, match=rf"mope_version={value!r} is not a version number"):
        mope.MoPEConfig.from_pretrained(str(tmp_path))
