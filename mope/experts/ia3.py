"""(IA)³ vector experts mixed as in MoV (Zadouri et al. 2023)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ExpertBank


class IA3ExpertBank(ExpertBank):
    """N learned scaling vectors ``L [N, d]``; a token's scale is the gate-weighted mean ``g L / sum(g)``.

    Output scaling (``y * l``) by default; input scaling (``W (x * l)``) for modules listed in
    ``feedforward_modules`` (feed-forward down projections, as PEFT's IA3). With gates that sum
    to 1 (top-k renormalised, softmax) this is exactly MoV's ``sum_e g_e l_e``; dividing by the sum
    keeps shared experts (weight 1) from inflating the scale. Vectors start at one. The mixed
    vector ``g L`` already is the soft merge of the experts, per token. A token with no expert (all
    gate weights 0: dropped by capacity, chosen by no expert) keeps scale 1, the base output.
    """

    soft_merge = "token"
    folds_by_scaling = True
    no_lora_form = "(IA)3 vectors, which scale activations: there is no low-rank update to export"

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__(in_features, out_features, config, num_experts)
        self.scales_input = scales_input = config.is_feedforward(module_name)
        size = in_features if scales_input else out_features
        self.ia3_l = nn.Parameter(torch.ones(num_experts, size))
        if not config.init_weights:
            nn.init.normal_(self.ia3_l, mean=1.0, std=0.2)

    def mixed_scale(self, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(self.ia3_l.dtype)
        total = weights.sum(dim=-1, keepdim=True)
        empty = total == 0  # a token no expert took (capacity dropped it, expert choice): scale 1, as the base
        return (weights @ self.ia3_l) / total.masked_fill(empty, 1.0) + empty.to(weights.dtype)

    def scale_input(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return x * self.mixed_scale(weights).to(x.dtype)

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.scales_input:
            return base_out
        return base_out * self.mixed_scale(weights).to(base_out.dtype)

    def unfolds(self, weights: torch.Tensor) -> bool:
        return bool((self.mixed_scale(weights) != 0).all())  # dividing by a zero scale wrote NaN into the base

    def fold_into(self, weight, bias, weights, sign=1):
        scale = self.mixed_scale(weights).to(weight.dtype)
        if sign < 0:
            scale = 1.0 / scale
        if self.scales_input:
            return weight * scale, bias
        return weight * scale[:, None], None if bias is None else bias * scale
