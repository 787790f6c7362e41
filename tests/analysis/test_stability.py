"""mope.analysis.routing_agreement (OpenMoE): how often two checkpoints route the same tokens to the same experts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import repeated_token_batches, routed_llama

import mope
from mope.analysis import routing_agreement


def test_identical_checkpoints_agree_fully_and_a_new_router_does_not():
    model = routed_llama(num_experts=4, top_k=2, router_init_std=1.0)
    batches = repeated_token_batches()
    same = routing_agreement(model, copy.deepcopy(model), batches)
    assert len(same) == 4
    for layer in same.values():
        assert layer["top1_agreement"] == layer["topk_agreement"] == 1.0
        assert layer["tokens"] == 3 * (4 * 16 - 5)
    other = copy.deepcopy(model)
    torch.manual_seed(7)
    for module in other.modules():
        if isinstance(module, mope.MoPELayer):
            torch.nn.init.normal_(module.mope_router["default"].weight, std=1.0)
    changed = routing_agreement(model, other, batches)
    for layer in changed.values():  # 4 experts: an unrelated router agrees about as often as chance
        assert layer["top1_agreement"] < 0.5 and layer["topk_agreement"] < 0.5


def test_agreement_refuses_models_adapted_in_different_modules():
    with pytest.raises(ValueError, match="different modules"):
        routing_agreement(routed_llama(["q_proj"]), routed_llama(["up_proj"]), repeated_token_batches(1))


def test_routers_of_other_sizes_are_not_compared_as_one_gate():
    # top_k 2 vs 1 read as a believable topk_agreement of 0.0; 4 vs 8 experts were compared index by index
    batches = repeated_token_batches(1)
    model = routed_llama(["q_proj"], num_experts=4, top_k=2, router_init_std=1.0)
    fewer = copy.deepcopy(model)
    for module in fewer.modules():
        if isinstance(module, mope.MoPELayer):
            module.mope_router["default"].top_k = 1  # a dense-to-sparse schedule between two checkpoints
    report = routing_agreement(model, fewer, batches)
    assert all(layer["top1_agreement"] == 1.0 and math.isnan(layer["topk_agreement"]) for layer in report.values())
    with pytest.raises(ValueError, match=r"routes over 4 experts in the first model and 8 in the second"):
        routing_agreement(model, routed_llama(["q_proj"], num_experts=8, top_k=2), batches)


def test_nan_routers_do_not_agree():
    model = routed_llama(num_experts=4, top_k=2, router_init_std=1.0)
    poisoned = "base_model.model.model.layers.1.mlp.up_proj"
    with torch.no_grad():
        dict(model.named_modules())[poisoned].mope_router["default"].weight.fill_(float("nan"))
    report = routing_agreement(model, copy.deepcopy(model), repeated_token_batches())
    nan = report.pop(poisoned)
    # before: both picked the same experts for every token, an agreement of 1.0
    assert math.isnan(nan["top1_agreement"]) and math.isnan(nan["topk_agreement"])
    assert nan["nonfinite_tokens"] == nan["tokens"] == 3 * (4 * 16 - 5)
    assert all(layer["nonfinite_tokens"] == 0 and layer["top1_agreement"] == 1.0 for layer in report.values())
