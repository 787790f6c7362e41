"""The top-k gate (mope.routing.top_k): its orders of softmax and top-k against GShard's formulation (weights and
gradients), exactly k experts when logits tie, and noisy top-k (softplus-scaled noise in training only, saved).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_router
from peft import get_peft_model
from torch.nn import functional as F

import mope
from mope.routing import RoutingInputs


def sparse_config(model: str, **kwargs) -> mope.MoPEConfig:
    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    base = {"target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4}
    return mope.MoPEConfig(task_type=task, **{**base, **kwargs})


def test_topk_orders():
    logits = torch.randn(5, 7, 6)
    inputs = RoutingInputs()
    renorm = make_router(n=6, k=3).gate(logits, inputs)
    shazeer = make_router(n=6, k=3, top_k_order="topk_then_softmax").gate(logits, inputs)
    raw = make_router(n=6, k=3, top_k_order="softmax_then_topk_unnormalised").gate(logits, inputs)
    torch.testing.assert_close(shazeer.weights, renorm.weights)  # equal in value, as documented
    # GShard's formulation spelled out (softmax, top-k of the probabilities, divide by their sum):
    # the same weights and the same gradient as the softmax over the top logits that mope computes
    reference_logits = logits.clone().requires_grad_()
    probs = reference_logits.softmax(-1)
    values, index = probs.topk(3, dim=-1)
    reference = torch.zeros_like(probs).scatter(-1, index, values / values.sum(-1, keepdim=True))
    ours_logits = logits.clone().requires_grad_()
    ours = make_router(n=6, k=3).gate(ours_logits, inputs).weights
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(reference)
    torch.testing.assert_close(
        torch.autograd.grad(ours, ours_logits, upstream)[0],
        torch.autograd.grad(reference, reference_logits, upstream)[0],
    )
    chosen = renorm.weights > 0
    assert (chosen.sum(-1) == 3).all() and torch.equal(raw.weights > 0, chosen)
    torch.testing.assert_close(raw.weights, logits.softmax(-1) * chosen)
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(5, 7))
    # without autograd mope takes another formulation (fewer forward ops): the same weights
    torch.testing.assert_close(renorm.weights, ours.detach())


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_topk_keeps_exactly_k_experts_when_logits_tie(grad):
    """A zero-initialised router scores every expert 0: still exactly k chosen, each weighted 1/k."""
    logits = torch.zeros(4, 6, requires_grad=grad)
    weights = make_router(n=6, k=2).gate(logits, RoutingInputs()).weights
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    assert set(weights.unique().tolist()) == {0.0, 0.5}


def test_noisy_top_k_noise_is_softplus_scaled_and_training_only():
    torch.manual_seed(0)
    router = make_router(n=4, k=1, router_noise=True)
    with torch.no_grad():
        router.weight.normal_()
        router.noise_weight.normal_()
    x = torch.randn(8)
    clean = F.linear(x, router.weight)
    router.train()
    draws = torch.stack([router.score(x) for _ in range(4000)]) - clean
    torch.testing.assert_close(draws.std(0), F.softplus(F.linear(x, router.noise_weight)), rtol=0.06, atol=0)
    torch.testing.assert_close(draws.mean(0), torch.zeros(4), rtol=0, atol=0.1)
    router.eval()
    torch.testing.assert_close(router.score(x), clean, rtol=0, atol=0)


def test_noise_weight_is_saved(tmp_path):
    model = get_peft_model(make_model("llama"), sparse_config("llama", router_noise=True))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(key.endswith("mope_router.noise_weight") for key in keys)
