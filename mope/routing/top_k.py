"""Token-choice top-k gate, as in GShard and Mixtral: softmax, keep the k largest, renormalise."""

from __future__ import annotations

import torch

from .base import Router, Routing, RoutingInputs


class TopKRouter(Router):
    """``g = renorm(top_k(softmax(W x)))``; unselected experts get weight exactly 0.

    Gradients reach the router through the selected weights only (Mixtral's convention).
    """

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        top_values, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top_index, top_values)
        load = torch.zeros_like(probs).scatter(-1, top_index, 1.0 / self.top_k)
        return Routing(weights=weights, probs=probs, logits=logits, load=load)
