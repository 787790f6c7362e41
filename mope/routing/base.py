"""The ``Routing`` value and the ``Router`` base class every gate strategy derives from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """What a gate decided for a batch of tokens (all tensors fp32, leading dims = token dims).

    ``weights``: ``[..., N]`` gate weight per expert, zero for experts a token does not use; this
    is all the dispatch needs. ``probs`` and ``logits``: the router's full softmax and raw scores
    (for losses and statistics). ``load``: each token's share of dispatch per expert, summing
    to 1 over experts (one-hot / k for top-k, the probabilities for a dense gate); the
    load-balancing loss reads it.
    """

    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    load: torch.Tensor


@dataclass
class RoutingInputs:
    """What a router may look at besides the hidden states (all optional).

    ``token_mask``: 1 for real tokens, 0 for padding, shaped like the hidden states' token dims
    (``[batch, seq]``), or None when unknown. Gates that look across tokens (capacity,
    expert choice, sequence pooling) must ignore padding through it.
    """

    token_mask: torch.Tensor | None = None


def init_router_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.normal_(weight, mean=0.0, std=std)


def init_router_zeros(weight: torch.Tensor, std: float) -> None:
    nn.init.zeros_(weight)


def init_router_kaiming(weight: torch.Tensor, std: float) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


ROUTER_INITS: dict[str, Callable[[torch.Tensor, float], None]] = {
    "normal": init_router_normal,
    "zeros": init_router_zeros,
    "kaiming": init_router_kaiming,
}


class Router(nn.Module):
    """A linear scoring layer plus a gate rule; subclasses implement :meth:`gate`.

    Scores are computed in fp32 whatever the model's dtype or autocast state: softmax and
    top-k on bf16 logits flip expert choices between otherwise equal runs.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = config.router_jitter
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))
        ROUTER_INITS[config.router_init](self.weight.data, config.router_init_std)

    def forward(self, x: torch.Tensor, inputs: RoutingInputs | None = None) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.gate(self.score(x.float()), inputs or RoutingInputs())

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[..., N]`` from fp32 hidden states (jitter applied in training)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return nn.functional.linear(x, self.weight.float())

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        """Turn fp32 logits into a Routing; what distinguishes one gate from another."""
        raise NotImplementedError

    def fixed_weights(self) -> torch.Tensor | None:
        """Gate weights if they do not depend on the input (then the mixture can be merged), else None."""
        if self.num_experts == 1:
            return torch.ones(1, device=self.weight.device)
        return None

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, in_features={self.weight.shape[1]}"
