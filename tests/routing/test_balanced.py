"""The balanced gate (BASE / S-BASE): every expert within one token of its share in training, top-k in eval."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from peft import get_peft_model

import mope
from mope.layer import MoPELayer
from mope.routing import ROUTERS, RoutingInputs


def make_router(n: int, k: int):
    return ROUTERS["balanced"](8, n, k, mope.MoPEConfig(num_experts=n, top_k=k, router="balanced"))


@pytest.mark.parametrize(("n", "k", "tokens"), [(4, 1, 37), (4, 2, 37), (5, 2, 23), (8, 3, 50), (6, 4, 13)])
@pytest.mark.parametrize("degenerate", [False, True])
def test_balanced_gives_every_expert_its_share_within_one(n, k, tokens, degenerate):
    torch.manual_seed(n * 100 + k * 10 + tokens)
    logits = torch.zeros(1, tokens, n) if degenerate else torch.randn(1, tokens, n) * 0.5
    logits[..., 0] += 6.0  # plain top-k collapses onto expert 0
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, :3] = 0
    router = make_router(n, k)
    router.eval()
    plain = router.gate(logits, RoutingInputs(token_mask=mask))
    assert (plain.weights[0, 3:, 0] > 0).all()  # collapsed at inference: top-k, every token on expert 0
    torch.testing.assert_close(plain.weights, plain.probs * (plain.weights > 0))
    router.train()
    routing = router.gate(logits, RoutingInputs(token_mask=mask))
    chosen = routing.weights > 0
    assert (chosen.sum(-1) == k).all()  # k distinct experts for every token
    counts = chosen[mask.bool()].sum(0).float()
    share = (tokens - 3) * k / n
    assert ((counts - share).abs() <= 1).all(), (counts, share)
    torch.testing.assert_close(routing.weights, routing.probs * chosen)  # plain softmax weights


def test_balanced_collapse_on_a_model_in_training():
    """Through a real layer: a router that sends every token to expert 0 is balanced in training."""
    model = get_peft_model(
        make_model("llama"),
        mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=1, router="balanced"),
    )
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    router = layer.mope_router["default"]
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1.0  # expert 0 scores sum(x); make every token prefer it by shifting the input
    seen = []
    router.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 16, 64) * 0.1 + 1.0
    layer.train()
    layer(x)
    counts = (seen[-1].weights > 0).reshape(-1, 4).sum(0)
    assert torch.equal(counts, torch.full((4,), 8))
    layer.eval()
    layer(x)
    assert (seen[-1].weights[..., 0] > 0).all()
