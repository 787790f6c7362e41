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

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = nn.functional.linear(h, self.weight.float())
            return self.gate(logits)

    def gate(self, logits: torch.Tensor) -> Routing:
        raise NotImplementedError

    def fixed_weights(self) -> torch.Tensor | None:
        """Gate weights if they do not depend on the input (then the mixture can be merged), else None."""
        if self.num_experts == 1:
            return torch.ones(1, device=self.weight.device)
        return None

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, in_features={self.weight.shape[1]}"
