"""The MOPE PEFT type: fails loudly if a PEFT upgrade changes how PeftType or registration works.

Registering is the one thing importing mope does: no PEFT class is patched (checked in a fresh process).
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys

import pytest
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


@pytest.mark.slow
def test_import_mope_patches_no_peft_class():
    """mope registers its PEFT type and changes nothing else of PEFT (checked in a fresh process)."""
    code = (
        "import peft, peft.auto as a\n"
        "classes = {peft.PeftModel, *a.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()}\n"
        "before = {(c, k): v for c in classes for k, v in vars(c).items()}\n"
        "import mope\n"
        "after = {(c, k): v for c in classes for k, v in vars(c).items()}\n"
        "changed = sorted(f'{c.__name__}.{k}' for c, k in before.keys() | after.keys() "
        "if before.get((c, k)) is not after.get((c, k)))\n"
        "assert not changed, changed\n"
        "assert len(classes) >= 6\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
