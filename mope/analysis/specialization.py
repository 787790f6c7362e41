"""Context-independent specialisation (OpenMoE, Xue et al. 2024): does the token id alone decide the expert?

For each router, over the data: the share of tokens whose top-1 expert is the most frequent
top-1 expert of their token id (*token-id predictability*), next to the share a single expert
for every token would get (*majority baseline*). A hash router scores 1 by construction;
OpenMoE found learned routers close to it, i.e. routing by token identity more than by context.

Tokens whose id occurs once are left out of both shares: they are predicted trivially. Tokens
whose router output is NaN/inf are counted in ``nonfinite_tokens``; if there are any, both shares
are NaN (a NaN row's argmax is expert 0 for every token: a perfect, false, predictability).
Counts live on the device as one ``[ids * N]`` histogram per router; ``report()`` reads them once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..routing import Router, Routing, RoutingInputs
from .choices import top_choice
from .hooks import RouterHooks, finite_tokens, token_mask
from .stats import Accumulator


class TokenExpertCounts:
    """Per router: how often each (token id, top-1 expert) pair occurred among real tokens."""

    def __init__(self, router: Router) -> None:
        self.num_experts = router.num_experts
        self.counts: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None

    def update(self, routing: Routing, inputs: RoutingInputs) -> None:
        top1 = top_choice(routing)
        ids = inputs.token_ids
        if ids is None or tuple(ids.shape) != tuple(top1.shape):
            return  # no token ids aligned with this layer's tokens (inputs_embeds, a decoder given labels only)
        real = token_mask(routing, inputs) > 0
        finite = finite_tokens(routing)
        self.nonfinite = Accumulator.add(self.nonfinite, (real & ~finite).sum())
        real &= finite
        pairs = ids.to(top1.device)[real].long() * self.num_experts + top1[real]
        self.counts = Accumulator.add_padded(self.counts, torch.bincount(pairs).float())

    def result(self) -> dict[str, float | int]:
        n = self.num_experts
        counts = torch.nn.functional.pad(self.counts, (0, -self.counts.numel() % n)).view(-1, n)
        per_id = counts.sum(-1)
        repeated = counts[per_id >= 2]
        tokens = repeated.sum().clamp_min(1)
        nonfinite = int(self.nonfinite.item())
        return {
            "token_id_predictability": math.nan if nonfinite else (repeated.max(-1).values.sum() / tokens).item(),
            "majority_baseline": math.nan if nonfinite else (repeated.sum(0).max() / tokens).item(),
            "repeated_tokens": int(repeated.sum().item()),
            "distinct_ids": int((per_id > 0).sum().item()),
            "nonfinite_tokens": nonfinite,
        }


@torch.no_grad()
def token_specialization(
    model: nn.Module, batches: Iterable[dict], adapter_name: str = "default"
) -> dict[str, dict[str, float | int]]:
    """Per module: token-id predictability of the top-1 expert, the majority baseline and the counts behind them."""
    with RouterHooks(model, TokenExpertCounts, adapter_name) as hooks:
        for batch in batches:
            model(**batch)
    return {name: counts.result() for name, counts in hooks.collectors.items() if counts.counts is not None}
