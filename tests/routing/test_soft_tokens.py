"""The soft_tokens gate (Soft MoE; mope.routing.soft_tokens): checked against Soft MoE written as a plain loop, then
through the model battery (forward/backward, save/load with identical logits, padding that changes nothing for real
tokens) and its refusal of causal models.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    check_soft_gate_ignores_padding,
    check_soft_gate_trains_and_round_trips,
    make_model,
)
from peft import get_peft_model
from torch import nn

import mope
from mope.layer import MoPELayer
from mope.routing import RoutingInputs

N, D_IN, D_OUT = 4, 16, 12


SOFT_TOKENS_CASES = {
    "lora": {"expert_type": "lora"},
    "lora_2_slots": {"expert_type": "lora", "slots_per_expert": 2},
    "adapter_parallel": {"expert_type": "adapter"},
    "adapter_series": {"expert_type": "adapter", "adapter_placement": "series", "slots_per_expert": 3},
}


def layer_of(router: str, **kwargs) -> MoPELayer:
    config = mope.MoPEConfig(num_experts=N, r=4, router=router, init_weights=False, **kwargs)
    torch.manual_seed(0)
    layer = MoPELayer(nn.Linear(D_IN, D_OUT), "default", config)
    with torch.no_grad():
        layer.mope_router["default"].weight.normal_(0, 0.5)
    return layer


def soft_moe_reference(layer: MoPELayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft MoE written as loops over sequences, slots and tokens."""
    bank, router = layer.mope_experts["default"], layer.mope_router["default"]
    p = router.slots_per_expert
    base = layer.base_layer(x)
    out = base.clone()
    for b in range(x.shape[0]):
        real = [t for t in range(x.shape[1]) if mask[b, t]]
        logits = x[b] @ router.weight.T  # [T, S]
        slot_out = []
        for s in range(N * p):
            e = s // p
            dispatch = torch.softmax(torch.stack([logits[t, s] for t in real]), dim=0)
            xs = sum(w * x[b, t] for w, t in zip(dispatch, real, strict=True))
            if isinstance(bank, mope.experts.LoRAExpertBank):
                y = bank.scaling * bank.lora_B[e].T @ (bank.lora_A[e] @ xs)
            else:
                z = sum(w * base[b, t] for w, t in zip(dispatch, real, strict=True)) if bank.series else xs
                h = bank.activation(bank.down[e] @ z + bank.down_bias[e])
                y = bank.scaling * (bank.up[e].T @ h + bank.up_bias[e])
            slot_out.append(y)
        for t in range(x.shape[1]):
            combine = torch.softmax(logits[t], dim=0)
            out[b, t] = base[b, t] + sum(c * y for c, y in zip(combine, slot_out, strict=True))
    return out


def soft_tokens_layer_output(layer: MoPELayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    router, bank = layer.mope_router["default"], layer.mope_experts["default"]
    routing = router(x, RoutingInputs(token_mask=mask))
    return router.apply_experts(bank, x, layer.base_layer(x), routing, routing.weights)


@pytest.mark.parametrize("case", list(SOFT_TOKENS_CASES))
def test_soft_tokens_equals_reference_loop(case):
    layer = layer_of("soft_tokens", **SOFT_TOKENS_CASES[case])
    x = torch.randn(2, 6, D_IN)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        got = soft_tokens_layer_output(layer, x, mask)
        torch.testing.assert_close(got, soft_moe_reference(layer, x, mask), rtol=1e-5, atol=1e-5)
        routing = layer.mope_router["default"](x, RoutingInputs(token_mask=mask))
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(2, 6))
        assert routing.dispatch[0, 4:].abs().max() == 0  # padding is dispatched to no slot


@pytest.mark.parametrize("case", list(SOFT_TOKENS_CASES))
def test_soft_tokens_padding_changes_nothing_for_real_tokens(case):
    layer = layer_of("soft_tokens", **SOFT_TOKENS_CASES[case])
    x = torch.randn(2, 5, D_IN)
    padded = torch.cat([x, torch.randn(2, 3, D_IN) * 10], dim=1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1)
    with torch.no_grad():
        want = soft_tokens_layer_output(layer, x, torch.ones(2, 5))
        got = soft_tokens_layer_output(layer, padded, mask)[:, :5]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- model battery ---------------------------------------------------------------------------

BATTERY = [
    ("bert", "soft_tokens", SOFT_TOKENS_CASES["lora_2_slots"]),
    ("bert", "soft_tokens", SOFT_TOKENS_CASES["adapter_parallel"]),
]


@pytest.mark.parametrize("model_name, router, kwargs", BATTERY)
def test_forward_backward_and_round_trip(model_name, router, kwargs, tmp_path):
    check_soft_gate_trains_and_round_trips(model_name, router, kwargs, tmp_path)


@pytest.mark.parametrize("model_name, router, kwargs", BATTERY)
def test_padding_changes_nothing_for_real_tokens(model_name, router, kwargs):
    check_soft_gate_ignores_padding(model_name, router, kwargs)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_soft_tokens_refuses_causal_task_types(task_type):
    with pytest.raises(ValueError, match=r"router='soft_tokens'.*task_type"):
        mope.MoPEConfig(task_type=task_type, router="soft_tokens")


def test_soft_tokens_refuses_decoder_modules_at_injection():
    config = mope.MoPEConfig(target_modules=["q_proj"], num_experts=N, router="soft_tokens")  # no task_type
    with pytest.raises(ValueError, match=r"router='soft_tokens' cannot adapt 'model\.layers\.0\.self_attn\.q_proj'"):
        get_peft_model(make_model("llama"), config)
    t5 = mope.MoPEConfig(target_modules=["q"], num_experts=N, router="soft_tokens")
    with pytest.raises(ValueError, match=r"router='soft_tokens' cannot adapt '.*decoder"):
        get_peft_model(make_model("t5"), t5)
    encoder_only = mope.MoPEConfig(target_modules=r".*encoder.*\.q$", num_experts=N, router="soft_tokens")
    get_peft_model(make_model("t5"), encoder_only)  # the T5 encoder is non-causal: allowed
