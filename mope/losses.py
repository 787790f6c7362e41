"""Auxiliary router losses: one implementation each, all ignoring padding.

Every function takes one layer's :class:`~mope.routing.Routing` and a token mask (1 = real
token, 0 = padding, or None) and returns a scalar. The tuner averages each loss over the
adapted modules and weights it by its config coefficient:

    aux_loss = sum_name coef_name * mean_over_modules(loss_name)

so a coefficient means the same thing whatever the depth of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .routing import Routing


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all token dims of ``values [..., N]`` (keeping N), counting only mask == 1."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is None:
        return flat.mean(dim=0)
    weights = mask.reshape(-1, 1).to(flat.dtype)
    return (flat * weights).sum(dim=0) / weights.sum().clamp_min(1.0)


def load_balancing_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch Transformer / GShard: ``N * sum_i f_i * P_i``.

    ``f_i`` is the share of dispatch that expert i receives (top-k: fraction of token slots;
    sums to 1), ``P_i`` the mean router probability. Equals 1 under perfectly uniform routing,
    up to N when all tokens collapse onto one expert. Only ``P`` carries gradient.
    """
    num_experts = routing.probs.shape[-1]
    share = masked_mean(routing.load.detach(), mask)
    prob = masked_mean(routing.probs, mask)
    return num_experts * (share * prob).sum()


def router_z_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``; keeps logits small."""
    z = torch.logsumexp(routing.logits, dim=-1, keepdim=True) ** 2
    return masked_mean(z, mask)[0]


@dataclass(frozen=True)
class AuxLoss:
    """A loss, the config field that weights it, and its function."""

    name: str
    coef_field: str
    fn: Callable[[Routing, torch.Tensor | None], torch.Tensor]


AUX_LOSSES: tuple[AuxLoss, ...] = (
    AuxLoss("load_balancing", "aux_loss_coef", load_balancing_loss),
    AuxLoss("z_loss", "z_loss_coef", router_z_loss),
)
