"""Balanced assignment (BASE, Lewis et al. 2021; S-BASE, Clark et al. 2022) in training, top-k at inference.

Training: Sinkhorn iterations turn the router scores into a balanced transport plan (each real
token sends mass k, each expert receives k*T/N); each token then takes the top-k experts of
that plan (S-BASE). Rounding the plan per token can still leave experts over- or under-full
(badly so when scores are degenerate, e.g. all equal), so a repair step then moves the
assignments that lose the least plan score from over-full to under-full experts until every
expert holds floor(k*T/N) or ceil(k*T/N) real tokens: within one token of its share, which is
the exact balance BASE's auction gives, at the cost of N - 1 sorts over the tokens.

Gate weights are the plain softmax probabilities of the chosen experts (no renormalisation), so
the router learns from the task loss while the assignment itself carries no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_int
from .base import Router, Routing, RoutingInputs, one_hot_shares

# Score given to padding rows: finite, so that an all-padding batch gives no NaN.
PADDING_SCORE = -1e9


def sinkhorn_potentials(
    scores: torch.Tensor, real: torch.Tensor, k: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn: ``(a [T, 1], b [1, N])`` with plan ``exp(scores + a + b)`` balanced over real tokens."""
    n = scores.shape[-1]
    num_tokens = real.sum().clamp_min(1).float()
    log_column = torch.log(k * num_tokens / n)
    log_row = math.log(k)
    scores = scores.masked_fill(~real.unsqueeze(-1), PADDING_SCORE)
    a = torch.zeros_like(scores[:, :1])
    b = torch.zeros_like(scores[:1])
    for _ in range(iterations):
        b = log_column - torch.logsumexp(scores + a, dim=0, keepdim=True)
        a = torch.where(real.unsqueeze(-1), log_row - torch.logsumexp(scores + b, dim=1, keepdim=True), 0.0)
    return a, b


def expert_targets(load: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Per-expert token counts that sum to ``total``: floor(total/N), +1 for the most loaded ``total mod N``."""
    n = load.shape[0]
    base, extra = total // n, total % n
    order = torch.argsort(load, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=load.device))
    return base + (rank < extra).long()


def repair_balance(held: torch.Tensor, preference: torch.Tensor, real: torch.Tensor, k: int) -> torch.Tensor:
    """Move assignments from over- to under-full experts until each holds floor or ceil of k*T/N.

    Each round moves ``min(excess, deficit)`` tokens from the most over-full expert to the most
    under-full one, those that lose the least preference first. Enough such tokens always exist
    (the over-full expert holds more tokens than the under-full one, so more than the excess of
    them lack it), and each round settles one expert, so N - 1 rounds suffice: a fixed count, no sync.
    """
    n = held.shape[-1]
    held = held & real.unsqueeze(-1)
    targets = expert_targets(held.sum(dim=0), k * real.sum())
    for _ in range(n - 1):
        excess = held.sum(dim=0) - targets
        over, under = excess.argmax().view(1), excess.argmin().view(1)
        moves = torch.minimum(excess[over], -excess[under]).clamp_min(0)
        has_over, has_under = held.index_select(1, over).squeeze(1), held.index_select(1, under).squeeze(1)
        movable = has_over & ~has_under
        loss = (preference.index_select(1, over) - preference.index_select(1, under)).squeeze(1)
        order = torch.argsort(loss.masked_fill(~movable, float("inf")), stable=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(held.shape[0], device=held.device))
        move = movable & (rank < moves)
        held[:, over] = (has_over & ~move).unsqueeze(1)
        held[:, under] = (has_under | move).unsqueeze(1)
    return held


def balanced_assignment(logits: torch.Tensor, real: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """``[T, k]`` expert indices for ``logits [T, N]``: balanced top-k of the Sinkhorn plan (no gradient)."""
    _, b = sinkhorn_potentials(logits, real, k, iterations)
    preference = logits + b  # each token's row of the plan, up to a per-token constant
    held = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, torch.topk(preference, k, dim=-1).indices, True)
    held = repair_balance(held, preference, real, k)
    index = torch.topk(preference.masked_fill(~held, float("-inf")), k, dim=-1).indices
    # padding takes no place: it gets the plain top-k
    return torch.where(real.unsqueeze(-1), index, torch.topk(logits, k, dim=-1).indices)


class BalancedRouter(Router):
    """Balanced top-k (Sinkhorn + quotas) while training, plain top-k in eval; weights = softmax probs."""

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.iterations: int = config.sinkhorn_iterations

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_int("MoPEConfig", "sinkhorn_iterations", config.sinkhorn_iterations, low=1)

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        if self.training:
            n = logits.shape[-1]
            flat = logits.detach().reshape(-1, n)
            if inputs.token_mask is None:
                real = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
            else:
                real = inputs.token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
            index = balanced_assignment(flat, real, self.top_k, self.iterations).reshape(*logits.shape[:-1], -1)
        else:
            index = torch.topk(probs, self.top_k, dim=-1).indices
        weights = torch.zeros_like(probs).scatter(-1, index, probs.gather(-1, index))
        load = one_hot_shares(logits, index, self.top_k)
        return Routing(weights=weights, probs=probs, logits=logits, load=load, chosen=index)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sinkhorn_iterations={self.iterations}"
