"""The MOPE PEFT type: fails loudly if a PEFT upgrade changes how PeftType or registration works."""

from __future__ import annotations

import copy
import json
import pickle

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import mope
from mope.registration import add_peft_type_member, register


def test_member_behaves_like_a_real_enum_member():
    member = PeftType.MOPE
    assert member is PeftType("MOPE") is PeftType["MOPE"]
    assert member in list(PeftType)
    assert member == "MOPE" and member.value.lower() == "mope"
    assert isinstance(member, PeftType)
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member


def test_registration_is_idempotent():
    count = len(PeftType)
    assert add_peft_type_member() is PeftType.MOPE
    register(mope.MoPEConfig, mope.MoPEModel)
    assert len(PeftType) == count


def test_peft_tables_point_at_mope():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOPE] is mope.MoPEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MOPE] is mope.MoPEModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MOPE] == "mope_"
    # plain string keys (as found in adapter_config.json) resolve too
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOPE"] is mope.MoPEConfig


def test_config_round_trips_through_adapter_config_json(tmp_path):
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=1, r=2, router="dense"
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOPE"
    assert "bundle" not in saved
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, mope.MoPEConfig)
    assert loaded.to_dict() == config.to_dict()


def test_every_config_field_has_help():
    from dataclasses import fields

    own = {f.name for f in fields(mope.MoPEConfig)} - {f.name for f in fields(PeftConfig)}
    assert own, "MoPEConfig defines no fields?"
    for f in fields(mope.MoPEConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"MoPEConfig.{f.name} has no help text"
