"""Bundles written by an older mope load unchanged: the same logits (to the last bits another CPU rounds).

``tests/bundles/old/d3192d0/`` holds one small bundle per expert type and gate family, saved by
mope at d3192d0 (the last commit before the architecture rework) together with the logits that
model gave; ``write_bundles.py`` beside them wrote them (its docstring says how to add a commit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_model
from peft import PeftModel
from safetensors.torch import load_file

OLD = Path(__file__).resolve().parent / "old"
CASES = sorted(path for path in OLD.glob("*/*") if (path / "adapter_config.json").is_file())


def test_there_are_old_bundles():
    assert len(CASES) >= 10


@pytest.mark.parametrize("adapter_name", ["default", "other"])
@pytest.mark.parametrize("folder", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_old_bundle_loads_with_the_logits_it_was_saved_with(folder, adapter_name):
    # under any adapter name: whole-FFN bundles, whose keys hold the name they were saved under inside
    # ("mope_experts.default.down.lora_A"), loaded under that name only
    config = json.loads((folder / "adapter_config.json").read_text())
    kind = config["base_model_type"]
    model = PeftModel.from_pretrained(make_model(kind), folder, adapter_name=adapter_name)
    batch = make_batch(kind, pad=2)
    batch.pop("labels")
    extra = {"mope_task_ids": torch.tensor([1, 2])} if config["routing_level"] == "task" else {}
    with torch.no_grad():
        got = model(**batch, **extra).logits
        with model.disable_adapter():
            base = model(**batch).logits
    want = load_file(folder / "logits.safetensors")["logits"]
    # the same arithmetic, up to the last bits that another CPU's kernels round differently (an AVX-512 machine
    # gave up to 2.7e-7 against these logits, saved on another); the adapters move them 10x further at least
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - base).abs().max() > 1e-5
