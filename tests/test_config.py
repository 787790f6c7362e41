"""MoPEConfig's own checks: a wrong field raises ValueError naming it, in code and through adapter_config.json.

Gate options (checked by each gate) are in routing/test_options.py, the numeric helpers in test_checks.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from conftest import Snapshot, assert_plain, make_batch, make_model
from peft import PeftConfig, get_peft_model

import mope
from mope import MoPEConfig

BAD_FIELDS = [
    ("num_experts", {"num_experts": 0}, "MoPEConfig.num_experts"),
    ("top_k > num_experts", {"num_experts": 4, "top_k": 5}, "MoPEConfig.top_k"),
    ("top_k", {"top_k": 0}, "MoPEConfig.top_k"),
    ("r", {"r": 0}, "MoPEConfig.r"),
    ("r non-int", {"r": 1.5}, "MoPEConfig.r"),
    ("lora_alpha", {"lora_alpha": 0}, "MoPEConfig.lora_alpha"),
    ("lora_dropout", {"lora_dropout": 1.0}, "MoPEConfig.lora_dropout"),
    ("router", {"router": "nope"}, "MoPEConfig.router="),
    ("router_init", {"router_init": "nope"}, "MoPEConfig.router_init"),
    ("expert_type", {"expert_type": "nope"}, "MoPEConfig.expert_type"),
    ("aux_loss_coef", {"aux_loss_coef": -1}, "MoPEConfig.aux_loss_coef"),
    ("z_loss_coef", {"z_loss_coef": -1}, "MoPEConfig.z_loss_coef"),
    ("router_jitter", {"router_jitter": 1.5}, "MoPEConfig.router_jitter"),
    ("init_weights", {"init_weights": "yes"}, "MoPEConfig.init_weights"),
    ("target_parameters", {"target_parameters": ["x"]}, "MoPEConfig.target_parameters"),
    ("layers_pattern", {"layers_pattern": "layers"}, "MoPEConfig.layers_pattern"),
]


@pytest.mark.parametrize(("field", "kwargs", "substring"), BAD_FIELDS, ids=[row[0] for row in BAD_FIELDS])
def test_invalid_config_field(field: str, kwargs: dict, substring: str) -> None:
    model = make_model("llama")
    batch = make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", **kwargs))
    assert substring in str(info.value), f"{field}: {info.value}"
    before.assert_same(model, batch)
    assert_plain(model)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_shared_experts": 4}, "num_shared_experts"),
        ({"num_shared_experts": 3, "top_k": 2}, "top_k"),
        ({"expert_type": "adapter", "adapter_placement": "middle"}, "adapter_placement"),
        ({"expert_type": "adapter", "adapter_activation": "swish2"}, "adapter_activation"),
        ({"expert_type": "adapter", "adapter_scaling": 0}, "adapter_scaling"),
        ({"feedforward_modules": ["down_proj"]}, "feedforward_modules"),
        ({"num_experts_pattern": {"mlp.*": 0}}, "num_experts_pattern"),
        ({"top_k_pattern": {"(": 1}}, "top_k_pattern"),
    ],
)
def test_invalid_config_combinations(kwargs, field):
    with pytest.raises(ValueError, match=f"MoPEConfig.{field}"):
        mope.MoPEConfig(**{"num_experts": 4, "top_k": 1, **kwargs})


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


def test_every_config_field_has_help():
    from dataclasses import fields

    own = {f.name for f in fields(mope.MoPEConfig)} - {f.name for f in fields(PeftConfig)}
    assert own, "MoPEConfig defines no fields?"
    for f in fields(mope.MoPEConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"MoPEConfig.{f.name} has no help text"
