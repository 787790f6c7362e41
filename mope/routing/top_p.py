"""Top-p gate: a dynamic number of experts per token (Huang et al. 2024, "Harder Tasks Need More Experts")."""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_number
from .base import Router, Routing, RoutingInputs


class TopPRouter(Router):
    """Keep the fewest experts whose probabilities sum to at least ``top_p``, at most ``top_k``; renormalise.

    With ``p = softmax(W x)`` sorted in decreasing order, expert j is kept when the probability
    mass ranked strictly above it is still below ``top_p`` (so the most likely expert is always
    kept) and its rank is below ``top_k`` (set ``top_k = num_experts`` for no cap). A confident
    token uses one expert, an uncertain one several. Ties keep the lower expert index first.
    Same cost as ``top_k`` with the masked mixture, plus one sort of N values per token.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.top_p = config.top_p

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_number("MoPEConfig", "top_p", config.top_p, low=0, high=1, low_open=True)

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        # the mass ranked above an expert is below top_p where the mass at and below it exceeds 1 - top_p: summed
        # from the tail, so top_p = 1 keeps every expert with p > 0 (the cumsum from the top reached 1.0 early in
        # fp32 and dropped small ones); the most likely expert is kept for any top_p
        tail = ranked.flip(-1).cumsum(dim=-1).flip(-1)
        rank = torch.arange(probs.shape[-1], device=probs.device)
        keep_ranked = ((tail > 1 - self.top_p) | (rank == 0)) & (rank < self.top_k)
        keep = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
        kept = probs * keep
        weights = kept / kept.sum(dim=-1, keepdim=True)
        load = keep.to(probs.dtype) / keep.sum(dim=-1, keepdim=True)
        # the kept experts are among the top_k ranked: the dispatch computes those
        chosen = order[..., : min(self.top_k, probs.shape[-1])]
        return Routing(weights=weights, probs=probs, logits=logits, load=load, chosen=chosen)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_p={self.top_p}"
