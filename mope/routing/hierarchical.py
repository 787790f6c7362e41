"""Hierarchical gate: a group gate times a within-group gate (Shazeer et al. 2017, section B)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ROUTER_INITS, Router, Routing, RoutingInputs, one_hot_shares
from .options import check_groups


class HierarchicalRouter(Router):
    """``p(e) = p(g) * p(e | g)``; the token takes its top-1 group, then the top-k experts inside it.

    The N experts are split in order into ``num_groups`` groups of S = N / G. One router GEMM
    scores G groups and N experts (``weight`` is ``[G + N, d]``); ``p(g)`` is a softmax over the
    groups, ``p(e | g)`` a softmax inside each group. Weights::

        g* = argmax_g p(g),   w_e = p(g*) * p(e|g*) / sum_{e' in topk(g*)} p(e'|g*)   for e in topk(g*)

    i.e. Mixtral's renormalised top-k inside the group, scaled by the group's probability (as
    Switch scales its top-1): with a renormalised group weight the group gate would get no
    gradient from the task loss. Why top-1 group then top-k (not top-k over the product): a token
    stays inside one group, so groups can specialise (e.g. LoRAMoE's knowledge / task groups, with
    the same ``num_groups``). ``probs`` is the full product (what the balancing loss reads);
    ``logits`` the raw sums ``a_g + b_e`` (what the z-loss bounds).
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        check_groups(num_experts, config.num_groups, top_k, "MoPEConfig.num_groups")
        self.group_size = num_experts // config.num_groups
        self.weight = nn.Parameter(torch.empty(config.num_groups + num_experts, in_features))
        ROUTER_INITS[config.router_init](self.weight.data, config.router_init_std)

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        groups, size = self.num_groups, self.group_size
        group_logits, expert_logits = logits.split([groups, self.num_experts], dim=-1)
        group_probs = torch.softmax(group_logits, dim=-1)
        within = torch.softmax(expert_logits.unflatten(-1, (groups, size)), dim=-1)
        probs = (group_probs.unsqueeze(-1) * within).flatten(-2)
        best = group_probs.argmax(dim=-1, keepdim=True)
        in_best = within.gather(-2, best.unsqueeze(-1).expand(*best.shape, size)).squeeze(-2)
        k = min(self.top_k, size)  # a schedule may start above the group size
        values, index = in_best.topk(k, dim=-1)
        values = values / values.sum(dim=-1, keepdim=True) * group_probs.gather(-1, best)
        index = index + best * size
        weights = torch.zeros_like(probs).scatter(-1, index, values)
        load = one_hot_shares(probs, index, k)
        raw = group_logits.repeat_interleave(size, dim=-1) + expert_logits
        return Routing(weights=weights, probs=probs, logits=raw, load=load)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"
