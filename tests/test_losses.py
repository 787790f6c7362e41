"""Router losses (mope.losses) against hand computations and reference code: load balancing, z-loss, importance CV^2,
entropy and LoRAMoE's localized balancing; padding counts nowhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, make_model, mope_model
from peft import get_peft_model
from torch import nn

import mope
from mope.layer import MoPELayer
from mope.losses import entropy_loss, importance_loss, load_balancing_loss, localized_balance_loss, router_z_loss
from mope.routing import Routing


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


def routing_of(logits: torch.Tensor, k: int | None = None) -> Routing:
    probs = logits.softmax(-1)
    weights = probs
    if k is not None:
        top = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    return Routing(weights=weights, probs=probs, logits=logits, load=weights)


def test_importance_loss_reference_values():
    n, tokens = 4, 12
    uniform = torch.eye(n).repeat(tokens // n, 1)
    collapsed = torch.zeros(tokens, n)
    collapsed[:, 0] = 1.0
    for weights, want in ((uniform, 0.0), (collapsed, n - 1.0)):  # CV^2 of [T, 0, 0, 0] is N - 1
        routing = Routing(weights=weights, probs=weights, logits=weights, load=weights)
        assert importance_loss(routing, None).item() == pytest.approx(want, abs=1e-6)
    logits = torch.randn(3, 5, n)
    routing = routing_of(logits, k=2)
    importance = routing.weights.reshape(-1, n).sum(0)
    want = importance.var(unbiased=False) / importance.mean() ** 2
    torch.testing.assert_close(importance_loss(routing, None), want)


def test_entropy_loss_reference_values():
    logits = torch.randn(2, 3, 4)
    routing = routing_of(logits)
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_loss(routing, None), -(p * p.log()).sum(-1).mean())
    selectors = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])  # one token, two selectors
    with_selectors = Routing(
        weights=selectors.mean(1),
        probs=selectors.mean(1),
        logits=selectors.mean(1),
        load=selectors.mean(1),
        selectors=selectors,
    )
    assert entropy_loss(with_selectors, None).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def loramoe_reference(weights: torch.Tensor, types: torch.Tensor, alpha: float) -> torch.Tensor:
    """LoRAMoE's code (peft/tuners/lora.py, ``blcls``): type 1 -> first half of the experts."""
    n = weights.shape[-1]
    types = types.view(-1, 1)
    own = torch.cat(((types == 1).repeat(1, n // 2), (types == 0).repeat(1, n // 2)), dim=-1)
    z = (weights.sum(dim=1) * torch.where(own, 1.0 + alpha, 1.0 - alpha)).flatten()
    return z.float().var() / (z.float().mean() ** 2 + 1e-10)


def test_localized_balance_matches_loramoe_code():
    routing = routing_of(torch.randn(4, 6, 4))
    groups = torch.tensor([0, 1, 1, 0])
    got = localized_balance_loss(routing, None, groups, num_groups=2, delta=0.1)
    torch.testing.assert_close(got, loramoe_reference(routing.weights, 1 - groups, 0.1))
    with pytest.raises(ValueError, match="group_ids"):
        localized_balance_loss(routing, None, None, num_groups=2, delta=0.1)


LOSSES = {
    "importance": lambda r, m: importance_loss(r, m),
    "entropy": lambda r, m: entropy_loss(r, m),
    "localized": lambda r, m: localized_balance_loss(r, m, torch.tensor([0, 1, 1]), num_groups=2, delta=0.2),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_ignore_padding(name):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])  # row 2: all padding
    poisoned = logits.clone()
    poisoned[mask == 0] = torch.tensor([30.0, -30.0, 0.0, 0.0])
    fn = LOSSES[name]
    torch.testing.assert_close(fn(routing_of(poisoned, k=2), mask), fn(routing_of(logits, k=2), mask))
    if name != "localized":  # real tokens only == the unpadded tokens on their own
        real = torch.cat([logits[0, :4], logits[1]])
        torch.testing.assert_close(fn(routing_of(logits, k=2), mask), fn(routing_of(real, k=2), None))
    else:  # the all-padding example counts nowhere: same as the batch without it
        trimmed = localized_balance_loss(routing_of(logits[:2], k=2), mask[:2], torch.tensor([0, 1]), 2, 0.2)
        torch.testing.assert_close(fn(routing_of(logits, k=2), mask), trimmed)


def test_group_ids_reach_the_localized_loss_in_the_model():
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4,
        aux_loss_coef=0.0, z_loss_coef=0.0, localized_balance_coef=1.0, importance_loss_coef=0.5,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config)
    model.train()
    batch = make_batch("llama", pad=2)
    a = model(**batch, group_ids=torch.tensor([0, 1])).aux_loss
    b = model(**batch, group_ids=torch.tensor([1, 1])).aux_loss
    assert a > 0 and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="group_ids"):
        model(**batch)
    for bad in ([0, 1], torch.tensor([0, 2]), torch.tensor([-1, 0])):  # a list was dropped; out of range taken
        with pytest.raises(ValueError, match=r"group_ids must (be a 1-D integer tensor|lie in \[0, num_groups=2\))"):
            model(**batch, group_ids=bad)
    model.eval()
    assert model(**batch).get("aux_loss") is None  # no loss, so no labels needed


def test_entropy_coefficient_may_be_negative_and_is_counted():
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4, router="dense",
        init_weights=False, router_temperature=0.5, entropy_loss_coef=-0.5, aux_loss_coef=0.0, z_loss_coef=0.0,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config)
    model.train()
    out = model(**make_batch("llama"))
    layers = sum(isinstance(m, MoPELayer) for m in model.modules())
    assert layers and out.aux_loss < 0  # - 0.5 * entropy (entropy > 0)
    assert out.aux_loss > -0.5 * math.log(4) - 1e-6


def checkpointed_mixture(use_reentrant: bool):
    model = mope_model("llama", target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.base_model.model.enable_input_require_grads()
    return model.train()


def router_grads(model, batch) -> list[torch.Tensor]:
    model.zero_grad()
    model(**batch).aux_loss.backward()
    return [p.grad.clone() for n, p in model.named_parameters() if "mope_router" in n]


def test_reentrant_checkpointing_is_refused_when_router_losses_would_not_reach_the_routers():
    """Before: aux_loss was added to the loss, but its gradient reached no router (the routings came from the
    checkpoint's no-grad first forward). Non-reentrant checkpointing gives the routers the same gradient."""
    batch = make_batch("llama")
    with pytest.raises(ValueError, match=r"use_reentrant.*False"):
        checkpointed_mixture(use_reentrant=True)(**batch)
    plain = mope_model("llama", target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2)
    for got, want in zip(
        router_grads(checkpointed_mixture(False), batch), router_grads(plain.train(), batch), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_reentrant_checkpointing_is_fine_without_router_losses_or_without_autograd():
    batch = make_batch("llama")
    model = checkpointed_mixture(use_reentrant=True)
    with torch.no_grad():
        assert model(**batch).aux_loss is not None  # no autograd: nothing to train, nothing refused
    for name, parameter in model.named_parameters():
        if "mope_router" in name:
            parameter.requires_grad_(False)  # frozen routers: their losses train nothing anyway
    model(**batch).loss.backward()


def test_a_training_forward_that_continues_a_cache_says_so():
    # sequence-level routing reuses the decision of the forward that made the cache: made under no_grad, the refusal
    # named reentrant gradient checkpointing (there was none); made in training, "run the prompt first" (it was)
    model = mope_model("llama", target_modules=["q_proj"], num_experts=4, top_k=1, routing_level="sequence").train()
    prompt, more = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    rest = {"input_ids": more, "labels": more, "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"it continues a KV cache .* Train on whole sequences"):
        model(past_key_values=cache, **rest)
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    model.base_model.routing_context.decisions.clear()
    with pytest.raises(RuntimeError, match=r"a training forward \(train mode, autograd on\) keeps none"):
        model(past_key_values=cache, **rest)


def test_a_frozen_active_adapter_beside_a_trainable_one_trains():
    # set_requires_grad on an inactive adapter: its trainable routers were taken for the active adapter's, and the
    # forward was refused as reentrant gradient checkpointing (there was none)
    model = mope_model("llama", target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2)
    model.add_adapter("other", model.peft_config["default"])
    model.base_model.set_requires_grad("other", True)
    model.base_model.set_requires_grad("default", False)
    out = model.train()(**make_batch("llama"))
    assert out.aux_loss is not None and not out.loss.requires_grad  # the active adapter trains nothing (as LoRA's)
    with pytest.raises(ValueError, match=r"use_reentrant.*False"):  # the active adapter's own routers: refused
        model.base_model.set_requires_grad("default", True)
        checkpointed = model.base_model.model
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        checkpointed.enable_input_require_grads()
        model(**make_batch("llama"))
