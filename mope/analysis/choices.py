"""Which expert(s) each token was routed to in the last forward, per router (kept on device).

The *top-1 choice* is the argmax of the router's probabilities: the expert the router prefers,
also for a token whose assignment capacity dropped. The *top-k set* is the ``top_k`` most
probable experts (the router's current ``top_k``, at most N). Token analyses (token-id
specialisation, stability between checkpoints, the token-to-expert map) all read these. A token
whose router output is NaN/inf has no choice (a NaN row's argmax is expert 0): ``finite`` marks
the others, and :func:`token_choices` refuses a forward with such a token.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..routing import Router, Routing, RoutingInputs
from .hooks import RouterHooks, finite_tokens, token_mask


def top_choice(routing: Routing) -> torch.Tensor:
    """``[*token_dims]`` index of each token's most probable expert."""
    return routing.probs.detach().argmax(-1)


def top_set(routing: Routing, k: int) -> torch.Tensor:
    """``[*token_dims, k]`` the k most probable experts of each token, sorted by index (comparable as sets)."""
    probs = routing.probs.detach()
    return probs.topk(min(k, probs.shape[-1]), dim=-1).indices.sort(-1).values


class ChoiceRecorder:
    """Keeps one router's choices of the latest forward: top-1, top-k set, mask and token ids."""

    def __init__(self, router: Router) -> None:
        self.k = max(1, int(getattr(router, "top_k", 1)))
        self.num_experts = router.num_experts
        self.top1 = self.topk = self.mask = self.finite = self.token_ids = None

    def update(self, routing: Routing, inputs: RoutingInputs) -> None:
        self.top1 = top_choice(routing)
        self.topk = top_set(routing, self.k)
        self.mask = token_mask(routing, inputs) > 0
        self.finite = finite_tokens(routing)
        ids = inputs.token_ids
        self.token_ids = ids if ids is not None and tuple(ids.shape) == tuple(self.top1.shape) else None


def record_choices(model: nn.Module, adapter_name: str = "default") -> RouterHooks[ChoiceRecorder]:
    """Hooks that keep every router's choices of the latest forward; use as a context manager."""
    return RouterHooks(model, ChoiceRecorder, adapter_name)


@torch.no_grad()
def token_choices(model: nn.Module, batch: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict:
    """One forward of ``batch``; per module, the top-1 expert of each token as ``[batch, seq]`` host ints.

    Raises ValueError naming the modules whose router gave NaN/inf for a real token: an int
    tensor cannot say NaN, and expert 0 (the argmax of a NaN row) would look like a choice.
    """
    with record_choices(model, adapter_name) as hooks:
        model(**batch)
    recorded = {name: rec for name, rec in hooks.collectors.items() if rec.top1 is not None}
    broken = [name for name, rec in recorded.items() if bool((rec.mask & ~rec.finite).any())]
    if broken:
        names = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise ValueError(
            f"Router output is NaN/inf for this batch in {names}: the top-1 expert of those tokens is undefined. "
            "The router weights or the layer inputs hold NaN/inf (a diverged training run?): check the adapter's "
            "weights, or load the base model in float32."
        )
    return {name: rec.top1.cpu() for name, rec in recorded.items()}
