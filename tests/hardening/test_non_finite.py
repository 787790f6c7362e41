"""Non-finite numbers (issue 16): NaN and +-inf are refused on every numeric MoPEConfig field, in code and
from adapter_config.json, and mope_version is parsed when the config is built (mope.checks does the checking).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import mope

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
