"""Wrong types never reach PEFT or torch (issue 16): every string or container field of MoPEConfig has one type
check (mope.checks.check_type, read from the field's type hint), in code and through adapter_config.json, and a
config file that is not a MoPE config (a list, no peft_type, another method's) is refused naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
from conftest import Snapshot, assert_plain, bundle_config, make_batch, make_model
from peft import PeftModel, get_peft_model

import mope
from mope.checks import check_type, describe_type
from mope.config import typed_fields

# field -> a value of the wrong type (5 unless 5 is of the right type or a list shows more).
WRONG = {
    "target_modules": ["q_proj", 5],
    "layers_to_transform": "0",
    "num_experts_pattern": {"q_proj": "2"},
    "top_k_pattern": [1],
    "auto_mapping": "LlamaForCausalLM",
}
CHECKED = [name for name, _ in typed_fields(mope.MoPEConfig)]
PLAIN_STRINGS = [
    f.name for f in dataclasses.fields(mope.MoPEConfig) if typing.get_type_hints(mope.MoPEConfig)[f.name] is str
]


def test_the_typed_fields_are_every_container_and_optional_string_field():
    assert set(CHECKED) == {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "target_modules", "exclude_modules", "target_parameters", "layers_to_transform", "layers_pattern",
        "modules_to_save", "num_experts_pattern", "top_k_pattern", "feedforward_modules", "router_blocks",
        "base_model_type", "upgraded_from", "bundle",
    }  # fmt: skip


@pytest.mark.parametrize("field", CHECKED)
def test_a_wrong_type_is_refused_naming_the_field_and_the_type(field):
    # Before: e.g. target_modules=123 "'int' object is not iterable", modules_to_save='lm_head' matched one
    # letter at a time, router_blocks='mlp' "matches no module", base_model_type=5 accepted.
    hint = typing.get_type_hints(mope.MoPEConfig)[field]
    bad = WRONG.get(field, 5)
    with pytest.raises(
        ValueError, match=rf"^MoPEConfig\.{field} must be {re.escape(describe_type(hint))}, got {re.escape(repr(bad))}$"
    ):
        mope.MoPEConfig(**{field: bad})


@pytest.mark.parametrize("field", PLAIN_STRINGS)
def test_a_plain_string_field_refuses_a_number_naming_the_field(field):
    # Plain strings are choices or versions: their own checks say what is allowed.
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field}(=5 is unknown| must be)"):
        mope.MoPEConfig(**{field: 5})


ISSUE_CASES = {
    "target_modules=123": {"target_modules": 123},
    "target_modules=['q_proj', 5]": {"target_modules": ["q_proj", 5]},
    "layers_to_transform='0'": {"target_modules": ["q_proj"], "layers_to_transform": "0"},
    "modules_to_save='lm_head'": {"modules_to_save": "lm_head"},
}


@pytest.mark.parametrize("kwargs", ISSUE_CASES.values(), ids=list(ISSUE_CASES))
def test_wrong_types_are_refused_before_the_model_is_touched(kwargs):
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    field = next(iter(kwargs)) if len(kwargs) == 1 else "layers_to_transform"
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field} must be "):
        get_peft_model(model, bundle_config(**kwargs))
    before.assert_same(model, batch)
    assert_plain(model)


def test_the_right_types_are_accepted():
    config = mope.MoPEConfig(
        target_modules=("q_proj", "v_proj"), exclude_modules={"k_proj"}, layers_to_transform=[0], layers_pattern="layers",
        modules_to_save=["lm_head"], num_experts_pattern={"q_proj": 4}, router_blocks=["mlp"], base_model_type="llama",
    )  # fmt: skip
    assert config.target_modules == {"q_proj", "v_proj"}
    assert mope.MoPEConfig(layers_to_transform=1, layers_pattern=["layers"]).layers_to_transform == 1


@pytest.mark.parametrize("target_modules", ["all-linear", r".*\.q_proj"])
def test_layers_to_transform_with_a_str_target_modules_is_refused_naming_both(target_modules):
    # PEFT refuses any str here too; "all-linear" is a str but not a regex, so the message says str.
    with pytest.raises(
        ValueError, match=r"^MoPEConfig\.layers_to_transform cannot be combined with a str target_modules"
    ):
        mope.MoPEConfig(target_modules=target_modules, layers_to_transform=[1], layers_pattern="layers")


INVALID_VALUES = {  # each reached torch or re before, which named no field
    "target_modules": ({"target_modules": "(["}, r"target_modules '\(\[' is not a valid regex"),
    "exclude_modules": ({"exclude_modules": "(["}, r"exclude_modules '\(\[' is not a valid regex"),
    "router_blocks": ({"router_blocks": ["mlp", "(["]}, r"router_blocks entry '\(\[' is not a valid regex"),
    "feedforward_modules": (
        {"expert_type": "ia3", "feedforward_modules": "(["},
        r"feedforward_modules '\(\[' is not a valid regex",
    ),
    "hash_seed": ({"router": "hash", "hash_seed": 2**64}, r"hash_seed must be an integer in \[0, "),
    "dselect_gamma": ({"router": "dselect_k", "dselect_gamma": 1e-320}, r"dselect_gamma must be a finite number >= "),
    "inference_mode": ({"inference_mode": "no"}, r"inference_mode must be True or False, got 'no'"),
}


@pytest.mark.parametrize(("kwargs", "words"), INVALID_VALUES.values(), ids=list(INVALID_VALUES))
def test_values_that_failed_later_are_refused_by_the_config_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{words}"):
        mope.MoPEConfig(**{"routing_level": "token", **kwargs})


def test_check_type_names_what_a_hint_allows():
    assert describe_type(list[str] | str | None) == "a list of strings, a string or None"
    assert describe_type(dict[str, int]) == "a dict of strings to integers"
    assert describe_type(list[int] | int | None) == "a list of integers, an integer or None"
    assert check_type("C", "x", {"a": 1}, dict[str, int]) == {"a": 1}
    for bad in ({"a": True}, {1: 1}, {"a": 1.5}, []):  # a bool is never an integer
        with pytest.raises(ValueError, match=r"^C\.x must be a dict of strings to integers, got "):
            check_type("C", "x", bad, dict[str, int])


# --- through adapter_config.json: load_mope and PeftModel.from_pretrained -------------------------------------


@pytest.fixture
def bundle(tmp_path):
    get_peft_model(make_model("llama"), bundle_config(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    return tmp_path


def rewrite_config(folder, change) -> str:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return str(path)


FILE_CASES = {
    "target_modules: 5": ("target_modules", 5),
    "target_modules: ['q_proj', 5]": ("target_modules", ["q_proj", 5]),
    "layers_to_transform: '0'": ("layers_to_transform", "0"),
    "router_blocks: 'mlp'": ("router_blocks", "mlp"),
}


@pytest.mark.parametrize(("field", "bad"), FILE_CASES.values(), ids=list(FILE_CASES))
def test_a_wrong_type_in_the_config_file_is_named_with_the_file(bundle, field, bad):
    path = rewrite_config(bundle, lambda config: {**config, field: bad})
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    message = rf"^MoPEConfig\.{field} must be .*, got .* \(read from '{path}'\)$"
    for load in (mope.load_mope, PeftModel.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(model, bundle)
    before.assert_same(model, batch)
    assert_plain(model)


NOT_MOPE = {
    "no peft_type": (lambda c: {k: v for k, v in c.items() if k != "peft_type"}, "has no 'peft_type' key"),
    "peft_type LORA": (lambda c: {**c, "peft_type": "LORA"}, "has peft_type='LORA': it is not a MoPE bundle"),
}


@pytest.mark.parametrize(("change", "problem"), NOT_MOPE.values(), ids=list(NOT_MOPE))
def test_a_config_file_that_is_not_a_mope_config_is_refused_by_load_mope(bundle, change, problem):
    # Before: load_mope loaded a config without peft_type as MoPE, and one saying LORA as a LoRA (PEFT dropped
    # the keys LoraConfig does not know, with a warning).
    path = rewrite_config(bundle, change)
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=f"^'{path}' {problem}"):
        mope.load_mope(model, bundle)
    with pytest.raises(ValueError, match="a MoPE bundle's config says peft_type='MOPE'"):
        mope.MoPEConfig.from_pretrained(bundle)
    before.assert_same(model, batch)
    assert_plain(model)
