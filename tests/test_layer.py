"""MoPELayer: one adapted module against an independent reference loop (values and gradients), PEFT's LoRA as the
one-expert case, and block routing (one router per block, its followers reuse the leader's gate).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import mope
from mope.layer import MoPELayer


def reference_gate(logits: torch.Tensor, router: str, k: int) -> torch.Tensor:
    """Gate weights by sorting, written independently of the library's topk/scatter."""
    probs = torch.softmax(logits, dim=-1)
    if router == "dense":
        return probs
    order = probs.argsort(dim=-1, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for slot in range(k):
        keep |= nn.functional.one_hot(order[..., slot], probs.shape[-1]).bool()
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def reference_layer(layer: MoPELayer, x: torch.Tensor, router: str, k: int) -> torch.Tensor:
    """A plain loop over experts: y = base(x) + sum_e g_e * s * B_e^T A_e x."""
    bank = layer.mope_experts["default"]
    gate = reference_gate(x @ layer.mope_router["default"].weight.T, router, k)
    out = layer.base_layer(x)
    for e in range(bank.num_experts):
        expert = (x @ bank.lora_A[e].T) @ bank.lora_B[e] * bank.scaling
        out = out + gate[..., e : e + 1] * expert
    return out


def wrapped_layer(base: nn.Module, router: str, num_experts: int = 6, top_k: int = 2) -> MoPELayer:
    config = mope.MoPEConfig(num_experts=num_experts, top_k=top_k, r=3, router=router, init_weights=False)
    torch.manual_seed(0)
    layer = MoPELayer(base, "default", config)
    with torch.no_grad():  # a router scale that makes the top-k choice non-trivial
        layer.mope_router["default"].weight.normal_(0, 1.0)
    return layer


@pytest.mark.parametrize("router", ["top_k", "dense"])
@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
def test_mixture_equals_reference_loop_with_gradients(router, base_type):
    torch.manual_seed(0)
    base = nn.Linear(16, 12) if base_type == "linear" else Conv1D(12, 16)
    layer = wrapped_layer(base, router)
    x = torch.randn(3, 5, 16, requires_grad=True)
    got = layer(x)
    want = reference_layer(layer, x, router, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    params = [x, layer.mope_experts["default"].lora_A, layer.mope_experts["default"].lora_B]
    params.append(layer.mope_router["default"].weight)
    upstream = torch.randn_like(got)
    grads_got = torch.autograd.grad(got, params, upstream)
    grads_want = torch.autograd.grad(want, params, upstream)
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_unselected_experts_get_zero_gradient():
    layer = wrapped_layer(nn.Linear(16, 12), "top_k", num_experts=6, top_k=1)
    x = torch.randn(1, 1, 16)
    layer(x).sum().backward()
    chosen = layer.mope_router["default"].weight.detach().matmul(x[0, 0]).argmax().item()
    grad_b = layer.mope_experts["default"].lora_B.grad
    for e in range(6):
        assert (grad_b[e].abs().sum() > 0) == (e == chosen)


def test_one_expert_top1_equals_peft_lora():
    """MoPE with N=1, k=1 is exactly PEFT's LoRA with the same A, B and alpha."""
    targets = ["q_proj", "v_proj", "down_proj"]
    batch = make_batch("llama")
    batch.pop("labels")
    lora = get_peft_model(
        make_model("llama"), LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    )
    mixture = get_peft_model(
        make_model("llama"),
        mope.MoPEConfig(target_modules=targets, num_experts=1, top_k=1, r=4, lora_alpha=8, init_weights=False),
    )
    lora_layers = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    copied = 0
    for name, layer in mixture.named_modules():
        if isinstance(layer, MoPELayer):
            bank = layer.mope_experts["default"]
            with torch.no_grad():
                bank.lora_A[0].copy_(lora_layers[name].lora_A["default"].weight)
                bank.lora_B[0].copy_(lora_layers[name].lora_B["default"].weight.T)
            copied += 1
    assert copied == 2 * len(targets)
    with torch.no_grad():
        torch.testing.assert_close(mixture(**batch).logits, lora(**batch).logits, rtol=0, atol=1e-6)


def test_a_block_whose_modules_see_two_token_streams_is_refused():
    # T5's cross-attention: q sees decoder tokens, k and v encoder tokens; k/v reused q's per-token decisions where
    # the two lengths matched (1.77 off), and generate failed
    base = make_model("t5")
    before = [(name, type(m)) for name, m in base.named_modules()]
    config = mope.MoPEConfig(target_modules=["q", "k", "v", "o"], router_blocks=["EncDecAttention"])
    with pytest.raises(ValueError, match=r"EncDecAttention\.q' and .*EncDecAttention\.k' .* see different tokens"):
        get_peft_model(base, config)
    assert [(name, type(m)) for name, m in base.named_modules()] == before


def test_block_level_routing_runs_one_router_per_block(tmp_path):
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules=["gate_proj", "up_proj", "down_proj"],
        num_experts=4,
        top_k=2,
        r=2,
        router_blocks=["mlp"],
        init_weights=False,
    )
    model = get_peft_model(make_model("llama"), config)
    mlp = model.base_model.model.model.layers[0].mlp
    assert "default" in mlp.gate_proj.mope_router
    assert "default" not in mlp.up_proj.mope_router and "default" not in mlp.down_proj.mope_router
    calls = []
    mlp.gate_proj.mope_router["default"].register_forward_hook(lambda *a: calls.append(1))
    records = []
    context = model.base_model.routing_context
    record = context.record
    context.record = lambda entry: records.append(entry) or record(entry)
    batch = make_batch("llama")
    model.train()
    out = model(**batch)
    assert len(calls) == 1
    # the followers used exactly the leader's gate weights
    x = torch.randn(1, 3, 64)
    routing = mlp.gate_proj.mope_router["default"](x)
    model.base_model.routing_context.block_routings[("default", "model.layers.0.mlp")] = routing
    bank = mlp.up_proj.mope_experts["default"]
    want = (
        mlp.up_proj.base_layer(x)
        + torch.einsum("btn,btno->bto", routing.weights, torch.einsum("bti,nri,nro->btno", x, bank.lora_A, bank.lora_B))
        * bank.scaling
    )
    torch.testing.assert_close(mlp.up_proj(x), want, rtol=1e-5, atol=1e-5)
    # one load-balancing record per block (2 layers' mlp), not per projection (6)
    assert out.aux_loss is not None
    assert [entry.loss_name for entry in records].count("load_balancing") == 2
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, rtol=0, atol=0)
