"""The masked mixture against independent reference implementations, and the router losses."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import mope
from mope.layer import MoPELayer
from mope.losses import load_balancing_loss, router_z_loss
from mope.routing import Routing


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


def routing_from_load(load: torch.Tensor, probs: torch.Tensor) -> Routing:
    return Routing(weights=load, probs=probs, logits=probs.log(), load=load)


def test_load_balancing_is_one_when_uniform_and_n_when_collapsed():
    n, tokens = 4, 32
    uniform_load = nn.functional.one_hot(torch.arange(tokens) % n, n).float()
    uniform = routing_from_load(uniform_load, torch.full((tokens, n), 1 / n))
    collapsed_probs = torch.full((tokens, n), 0.01)
    collapsed_probs[:, 0] = 0.97
    collapsed = routing_from_load(nn.functional.one_hot(torch.zeros(tokens).long(), n).float(), collapsed_probs)
    assert load_balancing_loss(uniform, None).item() == pytest.approx(1.0)
    assert load_balancing_loss(collapsed, None).item() == pytest.approx(n * 0.97)
    assert load_balancing_loss(uniform, None) < load_balancing_loss(collapsed, None)


def test_losses_ignore_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    probs = logits.softmax(-1)
    routing = Routing(weights=probs, probs=probs, logits=logits, load=probs)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    real = torch.cat([logits[0, :4], logits[1]])
    real_routing = Routing(weights=real.softmax(-1), probs=real.softmax(-1), logits=real, load=real.softmax(-1))
    for fn in (load_balancing_loss, router_z_loss):
        torch.testing.assert_close(fn(routing, mask), fn(real_routing, None))
        poisoned = logits.clone()
        poisoned[0, 4:] = 50.0
        poisoned_routing = Routing(
            weights=poisoned.softmax(-1), probs=poisoned.softmax(-1), logits=poisoned, load=poisoned.softmax(-1)
        )
        torch.testing.assert_close(fn(poisoned_routing, mask), fn(routing, mask))


def test_aux_loss_unchanged_by_padding_tokens():
    """Right-padding a causal batch leaves real tokens' states alone, so aux_loss must not move."""
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4)
    model = get_peft_model(make_model("llama"), config)
    model.train()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    short = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded = model(input_ids=padded_ids, attention_mask=padded_mask)
    unmasked = model(input_ids=padded_ids, attention_mask=torch.ones_like(padded_ids))
    torch.testing.assert_close(padded.aux_loss, short.aux_loss, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(unmasked.aux_loss, short.aux_loss, rtol=1e-5, atol=1e-7)


def test_aux_loss_is_mean_over_layers_weighted_by_coefficients():
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        num_experts=4,
        top_k=2,
        r=4,
        aux_loss_coef=0.5,
        z_loss_coef=0.25,
    )
    model = get_peft_model(make_model("llama"), config)
    model.train()
    seen = []
    ctx = model.base_model.routing_context
    original = ctx.record

    def spy(record):
        seen.append(record)
        original(record)

    ctx.record = spy
    out = model(**make_batch("llama", pad=2))
    layers = sum(isinstance(m, MoPELayer) for m in model.modules())
    # the reference: each layer's loss on its own (the tuner batches them over layers)
    lb = torch.stack([load_balancing_loss(r.routing, r.mask) for r in seen if r.loss_name == "load_balancing"])
    z = torch.stack([router_z_loss(r.routing, r.mask) for r in seen if r.loss_name == "z_loss"])
    assert len(lb) == len(z) == layers
    torch.testing.assert_close(out.aux_loss, 0.5 * lb.mean() + 0.25 * z.mean())
    # the gradient reaches each layer's logits alike (the batched losses take the softmax of all layers at once)
    tensors = [r.routing.logits for r in seen if r.loss_name == "load_balancing"]
    grads = torch.autograd.grad(out.aux_loss, tensors, retain_graph=True)
    expected = torch.autograd.grad(0.5 * lb.mean() + 0.25 * z.mean(), tensors)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_no_aux_loss_in_eval_mode():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4)
    model = get_peft_model(make_model("llama"), config)
    model.eval()
    out = model(**make_batch("llama"))
    assert out.get("aux_loss") is None
