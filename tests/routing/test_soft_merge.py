"""The soft_merge gate (SMEAR / MoV; mope.routing.soft_merge): checked against merging the experts' parameters by
hand from the bank's tensors and the router's probabilities, then through the model battery (forward/backward,
save/load with identical logits, padding that changes nothing for real tokens) and cached generation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    check_soft_gate_ignores_padding,
    check_soft_gate_trains_and_round_trips,
    make_batch,
    make_model,
    soft_gate_config,
)
from peft import get_peft_model
from torch import nn

import mope
from mope.layer import MoPELayer
from mope.routing import RoutingInputs

N, D_IN, D_OUT = 4, 16, 12


SOFT_MERGE_CASES = {  # name -> config kwargs
    "lora_factors": {"expert_type": "lora", "soft_merge_lora": "factors", "routing_level": "sequence"},
    "lora_delta": {"expert_type": "lora", "soft_merge_lora": "delta", "routing_level": "sequence"},
    "shared_a": {"expert_type": "lora_shared_a", "routing_level": "sequence"},
    "adapter_parallel": {"expert_type": "adapter", "routing_level": "sequence", "adapter_activation": "gelu"},
    "adapter_series": {"expert_type": "adapter", "routing_level": "sequence", "adapter_placement": "series"},
    "ia3": {"expert_type": "ia3"},
}


def layer_of(router: str, **kwargs) -> MoPELayer:
    config = mope.MoPEConfig(num_experts=N, r=4, router=router, init_weights=False, **kwargs)
    torch.manual_seed(0)
    layer = MoPELayer(nn.Linear(D_IN, D_OUT), "default", config)
    with torch.no_grad():
        layer.mope_router["default"].weight.normal_(0, 0.5)
    return layer


def soft_merge_by_hand(layer: MoPELayer, x: torch.Tensor, case: str) -> torch.Tensor:
    """The merged expert built by hand, per sequence (per token for (IA)3), from the bank's tensors."""
    bank, router = layer.mope_experts["default"], layer.mope_router["default"]
    base = layer.base_layer(x)
    if case == "ia3":
        probs = torch.softmax(x @ router.weight.T, dim=-1)  # per token
        return base * torch.einsum("btn,nd->btd", probs, bank.ia3_l)
    probs = torch.softmax(x.mean(dim=1) @ router.weight.T, dim=-1)  # per sequence: the mean-pool
    out = torch.empty_like(base)
    for b in range(x.shape[0]):
        g = probs[b]
        if case == "lora_factors":
            a = sum(g[e] * bank.lora_A[e] for e in range(N))
            bb = sum(g[e] * bank.lora_B[e] for e in range(N))
            out[b] = base[b] + bank.scaling * (x[b] @ a.T) @ bb
        elif case in ("lora_delta", "shared_a"):
            a = [bank.lora_A[e] if case == "lora_delta" else bank.lora_A for e in range(N)]
            delta = sum(g[e] * bank.scaling * bank.lora_B[e].T @ a[e] for e in range(N))  # [d_out, d_in]
            out[b] = base[b] + x[b] @ delta.T
        else:  # adapter
            down = sum(g[e] * bank.down[e] for e in range(N))
            down_bias = sum(g[e] * bank.down_bias[e] for e in range(N))
            up = sum(g[e] * bank.up[e] for e in range(N))
            up_bias = sum(g[e] * bank.up_bias[e] for e in range(N))
            z = base[b] if bank.series else x[b]
            out[b] = base[b] + bank.scaling * (bank.activation(z @ down.T + down_bias) @ up + up_bias)
    return out


@pytest.mark.parametrize("case", list(SOFT_MERGE_CASES))
def test_soft_merge_equals_merging_by_hand(case):
    layer = layer_of("soft_merge", **SOFT_MERGE_CASES[case])
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), soft_merge_by_hand(layer, x, case), rtol=1e-5, atol=1e-5)


def test_soft_merge_delta_is_the_mixture_of_outputs_and_factors_is_not():
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        delta = layer_of("soft_merge", **SOFT_MERGE_CASES["lora_delta"])
        routing = delta.route("default", x, RoutingInputs())
        mixture = delta.mope_experts["default"](x, delta.base_layer(x), routing.weights)  # dense mixture of outputs
        torch.testing.assert_close(delta(x), mixture, rtol=1e-5, atol=1e-5)
        factors = layer_of("soft_merge", **SOFT_MERGE_CASES["lora_factors"])
        assert (factors(x) - mixture).abs().max() > 1e-3


# --- model battery ---------------------------------------------------------------------------

BATTERY = [
    ("bert", "soft_merge", SOFT_MERGE_CASES["lora_factors"]),
    ("bert", "soft_merge", SOFT_MERGE_CASES["lora_delta"]),
    ("bert", "soft_merge", SOFT_MERGE_CASES["adapter_parallel"]),
    ("bert", "soft_merge", SOFT_MERGE_CASES["ia3"]),
    ("llama", "soft_merge", SOFT_MERGE_CASES["lora_factors"]),
    ("llama", "soft_merge", SOFT_MERGE_CASES["lora_delta"]),
    ("llama", "soft_merge", SOFT_MERGE_CASES["adapter_series"]),
    ("llama", "soft_merge", SOFT_MERGE_CASES["ia3"]),
]


@pytest.mark.parametrize("model_name, router, kwargs", BATTERY)
def test_forward_backward_and_round_trip(model_name, router, kwargs, tmp_path):
    check_soft_gate_trains_and_round_trips(model_name, router, kwargs, tmp_path)


@pytest.mark.parametrize("model_name, router, kwargs", BATTERY)
def test_padding_changes_nothing_for_real_tokens(model_name, router, kwargs):
    check_soft_gate_ignores_padding(model_name, router, kwargs)


def test_soft_merge_generation_reuses_the_prompt_decision():
    config = soft_gate_config("llama", "soft_merge", **SOFT_MERGE_CASES["lora_factors"])
    model = get_peft_model(make_model("llama"), config).eval()
    prompt = make_batch("llama")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], **kwargs)
    plain = model.generate(
        input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], use_cache=False, **kwargs
    )
    assert torch.equal(cached, plain)


def test_soft_merge_ia3_at_token_level_is_accepted():
    mope.MoPEConfig(router="soft_merge", expert_type="ia3")
    mope.MoPEConfig(router="soft_merge", expert_type="lora", routing_level="task", num_tasks=2)
