"""ZeRO-3: every MoPE layer gathers its routers' weights with its own (DeepSpeed cannot see into a Routing)."""

from __future__ import annotations

import pytest
from conftest import make_model
from peft import get_peft_model

import mope
import mope.tuner
from mope.layer import MoPELayer

pytest.importorskip("deepspeed")


def test_under_zero3_each_layer_registers_its_routers_as_external_parameters(monkeypatch):
    """Before: only the recipe loop did this, so Trainer/TRL under ZeRO-3 failed in AccumulateGrad."""
    config = mope.MoPEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=2)
    plain = get_peft_model(make_model("llama"), config)
    assert not any(getattr(m, "_external_params", None) for m in plain.modules())
    monkeypatch.setattr(mope.tuner, "is_deepspeed_zero3_enabled", lambda: True)
    model = get_peft_model(make_model("llama"), config)
    layers = [m for m in model.modules() if isinstance(m, MoPELayer)]
    assert len(layers) == 4
    for layer in layers:
        external = {id(p) for p in layer._external_params.values()}
        assert external == {id(p) for p in layer.mope_router.parameters()}
