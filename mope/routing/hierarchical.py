"""Hierarchical gate: a group gate times a within-group gate (Shazeer et al. 2017, section B)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Router, Routing, RoutingInputs, one_hot_shares


def check_groups(routed: int, num_groups: int, top_k: int, where: str) -> None:
    """Groups of equal size, and top_k experts must fit in one group."""
    if routed % num_groups != 0:
        raise ValueError(f"{where}={num_groups} must divide the routed experts ({routed}) into equal groups")
    if top_k > routed // num_groups:
        raise ValueError(
            f"{where}={num_groups} leaves {routed // num_groups} experts per group, fewer than top_k={top_k}: "
            "router='hierarchical' picks top_k experts inside one group"
        )


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
        check_groups(num_experts, config.num_groups, top_k, "MoPEConfig.num_groups")  # per module (patterns)
        self.group_size = num_experts // config.num_groups

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> int:
        return config.num_groups + num_experts  # group logits, then expert logits

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        """``num_groups`` (a shared option, checked in mope.routing.options) must split the routed experts evenly."""
        routed = config.num_experts - config.num_shared_experts
        check_groups(routed, config.num_groups, config.top_k, "MoPEConfig.num_groups")

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
        return Routing(weights=weights, probs=probs, logits=raw, load=load, chosen=index)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"
