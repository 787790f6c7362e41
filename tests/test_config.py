"""MoPEConfig's own checks: a wrong field raises ValueError naming it, in code and through adapter_config.json.

Gate options (checked by each gate) are in routing/test_options.py, the numeric helpers in test_checks.py.
"""

from __future__ import annotations

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


def test_every_config_field_has_help():
    from dataclasses import fields

    own = {f.name for f in fields(mope.MoPEConfig)} - {f.name for f in fields(PeftConfig)}
    assert own, "MoPEConfig defines no fields?"
    for f in fields(mope.MoPEConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"MoPEConfig.{f.name} has no help text"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("router_temperature", 0.0, "MoPEConfig.router_temperature"),  # a NaN loss before
        ("router", "topk", "MoPEConfig.router='topk' is unknown"),  # a bare KeyError before
        ("r", 0, "MoPEConfig.r"),  # ZeroDivisionError before
        ("capacity_policy", "bpr_typo", "MoPEConfig.capacity_policy"),  # accepted silently before
        ("target_modules", 5, "MoPEConfig.target_modules"),
        ("task_type", "CAUSAL_LMM", "MoPEConfig.task_type='CAUSAL_LMM' is not one of PEFT's task types"),
    ],
)
def test_a_field_assigned_after_construction_is_checked_before_the_model_is_touched(field, value, words):
    # PEFT's idiom config.r = 16: the constructor's checks did not run again
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    setattr(config, field, value)
    with pytest.raises(ValueError, match=words):
        get_peft_model(model, config)
    before.assert_same(model, batch)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        # PEFT saves the config with its keys sorted: which overlapping pattern won changed (top_k 2 for 1: 0.026 off)
        ({"top_k_pattern": {"q_proj": 1, ".*_proj": 2}}, r"top_k_pattern: keys 'q_proj' \(1\) and '\.\*_proj' \(2\)"),
        ({"num_experts_pattern": {"v_proj": 3, ".*_proj": 4}}, "num_experts_pattern: keys 'v_proj' "),
    ],
)
def test_overlapping_patterns_and_a_misspelt_entry_are_refused(options, words):
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, **options)
    with pytest.raises(ValueError, match=words):
        get_peft_model(model, config)
    before.assert_same(model, batch)
    for fine in (
        {"top_k_pattern": {"q_proj": 1, ".*_proj": 1}},  # overlapping with one value
        {"top_k_pattern": {".*_proj": 2, "q_proj": 1}},  # the first given is the first sorted: a saved one loads so
    ):
        targets = ["q_proj", "v_proj", "fc2"] if "feedforward_modules" in fine else ["q_proj", "v_proj"]
        get_peft_model(make_model("llama"), MoPEConfig(target_modules=targets, num_experts=4, **fine))


def test_a_pattern_key_that_an_earlier_key_shadows_everywhere_is_warned_about():
    # the first matching key wins (PEFT's rule): 'q_proj' after '.*_proj' applied nowhere, silently
    config = MoPEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k_pattern={".*_proj": 2, "q_proj": 1})
    with pytest.warns(UserWarning, match="top_k_pattern key 'q_proj' applies to no module"):
        model = get_peft_model(make_model("llama"), config)
    assert {layer.mope_settings["default"].top_k for layer in model.modules() if hasattr(layer, "mope_settings")} == {2}


def test_a_feedforward_modules_entry_that_matches_nothing_is_warned_about():
    # a typo beside an entry that matches was silent; refusing it refused a list written for several architectures
    config = MoPEConfig(target_modules=["q_proj", "v_proj"], expert_type="ia3", feedforward_modules=["v_proj", "q_prj"])
    with pytest.warns(UserWarning, match="feedforward_modules entry 'q_prj' matches none of adapter 'default'"):
        get_peft_model(make_model("llama"), config)


def test_a_router_blocks_entry_that_links_nothing_is_warned_about():
    # a typo beside an entry that links was silent; refusing it refused a list shared by adapters of other targets
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], router_blocks=["self_attn", "mlpp"])
    with pytest.warns(UserWarning, match="router_blocks entry 'mlpp' of adapter 'default' matches no module"):
        get_peft_model(make_model("llama"), config)


def test_a_frozenset_of_targets_saves(tmp_path):
    # accepted, then PeftModel.save_pretrained wrote a 0-byte adapter_config.json (frozenset is not JSON)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=frozenset({"q_proj"}), num_experts=2)
    model = get_peft_model(make_model("llama"), config)
    model.peft_config["default"].exclude_modules = frozenset({"lm_head"})  # assigned after construction
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    assert saved.target_modules == {"q_proj"} and saved.exclude_modules == {"lm_head"}


def test_a_config_from_a_newer_mope_is_refused_by_every_reader_and_saved_with_this_version(tmp_path):
    # transformers' load_adapter reads a bundle with PeftConfig.from_pretrained, which skipped mope's upgrade
    import json

    with pytest.raises(ValueError, match=r"mope_version='9\.0'.*newer than this mope"):
        MoPEConfig(mope_version="9.0")
    config = MoPEConfig(target_modules=["q_proj"], mope_version="0.0.1")
    assert config.to_dict()["mope_version"] == mope.__version__  # this mope writes the file
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "mope_version": "9.0.0"}))
    with pytest.raises(ValueError, match=r"9\.0\.0.*newer than this mope"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_frozen_experts_that_start_as_the_identity_are_refused():
    # the model could never leave the base: only the routers trained, and they changed nothing
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=r"freeze_experts=True with init_weights=True: every expert starts as the"):
        get_peft_model(model, MoPEConfig(target_modules=["q_proj"], freeze_experts=True))
    before.assert_same(model, batch)
    frozen = get_peft_model(model, MoPEConfig(target_modules=["q_proj"], freeze_experts=True, init_weights=False))
    assert not any(p.requires_grad for name, p in frozen.named_parameters() if "mope_experts" in name)
