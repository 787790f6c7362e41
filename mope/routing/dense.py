"""Dense softmax gate: every expert acts on every token, weighted by the softmax."""

from __future__ import annotations

import torch

from .base import Router, Routing, RoutingInputs


class DenseRouter(Router):
    """``g = softmax(W x)``. ``top_k`` is ignored; the load is the probability itself."""

    sparse_weights = False
    schedules_top_k = False  # every expert acts on every token: there is no k to anneal

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        return Routing(weights=probs, probs=probs, logits=logits, load=probs)
