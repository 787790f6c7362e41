"""DSelect-k (Hazimeh et al. 2021): a smooth, differentiable top-k through binary-encoded selectors."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..checks import check_number
from .base import Router, Routing, RoutingInputs


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """0 below -gamma/2, 1 above gamma/2, the cubic ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def bits_for(num_experts: int) -> int:
    """Bits m of a binary expert index: ceil(log2 N) (0 for a single expert)."""
    return math.ceil(math.log2(num_experts)) if num_experts > 1 else 0


class DSelectKRouter(Router):
    """k single-expert selectors, each a product of smooth steps over the bits of the expert index.

    With m = ceil(log2 N) bits, selector i has m logits ``z_i`` and gives code c the weight
    ``r_i(c) = prod_j S(z_ij)^{bit_j(c)} (1 - S(z_ij))^{1 - bit_j(c)}`` (a distribution over the
    2^m codes; S = :func:`smooth_step`). The selectors are mixed by ``softmax(alpha)``::

        w = sum_i softmax(alpha)_i r_i         (alpha, z = linear maps of the router input)

    Once the z's leave (-gamma/2, gamma/2) each selector is one-hot, so at most k experts get
    weight, and training gets there by gradient descent alone (no top-k, no noise).

    Mapping to the N experts: when N is not a power of two, code c >= N is folded onto expert
    c - N, so every selector stays a distribution over the real experts and ``w`` sums to 1. (The
    paper instead penalises the unreachable codes with a regulariser; folding needs none, at the
    price of experts 0 .. 2^m - N - 1 owning two codes.) ``probs = load = w``;
    ``selectors`` are the k ``r_i``, whose entropy the entropy loss penalises: the paper's
    regulariser pushing selectors to binary is ``entropy_loss_coef > 0``. ``logits`` are
    ``log w``, so the z-loss is 0 here. ``top_k`` is the number of selectors (an upper bound on
    the experts used); the schedule does not anneal it.
    """

    schedules_top_k = False
    sparse_weights = False  # smooth-step selectors spread weight over many experts early in training

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.num_selectors = top_k
        self.num_bits = bits_for(num_experts)
        self.gamma = config.dselect_gamma

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> int:
        return top_k * bits_for(num_experts) + top_k  # z: k selectors x m bits, then the k mixture logits alpha

    def init_weight(self, weight: torch.Tensor, config: Any) -> None:
        super().init_weight(weight, config)
        if config.router_init != "zeros":  # the paper's init: z near 0, every selector starts near uniform
            z_rows = weight.shape[0] - self.top_k
            nn.init.uniform_(weight[:z_rows], -config.dselect_gamma / 100, config.dselect_gamma / 100)

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_number(  # gamma**3 of a smaller one underflows in the smooth step's cubic
            "MoPEConfig", "dselect_gamma", config.dselect_gamma, low=1e-6
        )

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        k, m, n = self.num_selectors, self.num_bits, self.num_experts
        z = logits[..., : k * m].unflatten(-1, (k, m))
        alpha = logits[..., k * m :]
        codes = torch.arange(2**m, device=logits.device)
        bits = ((codes.unsqueeze(-1) >> torch.arange(m - 1, -1, -1, device=logits.device)) & 1).bool()
        step = smooth_step(z, self.gamma).unsqueeze(-2)  # [..., k, 1, m]
        per_code = torch.where(bits, step, 1.0 - step).prod(dim=-1)  # [..., k, 2^m]
        fold = nn.functional.one_hot(codes % n, n).to(per_code.dtype)  # code -> expert
        selectors = per_code @ fold  # [..., k, N]
        weights = (torch.softmax(alpha, dim=-1).unsqueeze(-1) * selectors).sum(dim=-2)
        return Routing(
            weights=weights, probs=weights, logits=weights.clamp_min(1e-12).log(), load=weights, selectors=selectors
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", selectors={self.num_selectors}, bits={self.num_bits}, gamma={self.gamma}"
