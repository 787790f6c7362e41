"""Bottleneck adapter experts (Houlsby / Pfeiffer in series, He et al. in parallel)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ExpertBank, merge_stacked

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterExpertBank(ExpertBank):
    """N bottleneck adapters ``u_e(act(D_e z + b_e)) + c_e`` applied as one masked computation.

    ``placement="series"``: ``z`` is the module's output and the result is added to it.
    ``placement="parallel"``: ``z`` is the module's input and the result is added to the output.
    The activation is elementwise per expert block, so zero gate weights remove unselected
    experts exactly (and give them zero gradient): no loop over experts.
    ``up [N, r, d_out]`` starts at zero, so the wrapped model starts at the base model.
    Soft merging merges down, down bias, up and up bias once per sequence (SMEAR).
    """

    soft_merge = "sequence"
    soft_tokens = True
    no_lora_form = "bottleneck adapters, which are nonlinear: no LoRA reproduces them"

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__(in_features, out_features, config, num_experts)
        self.series = config.adapter_placement == "series"
        d_z = out_features if self.series else in_features
        r = config.r
        self.r = r
        self.scaling = config.adapter_scaling
        self.activation = ACTIVATIONS[config.adapter_activation]()
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(num_experts, r, d_z))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, r))
        self.up = nn.Parameter(torch.empty(num_experts, r, out_features))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, out_features))
        for d in self.down.data:
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.up)
        else:
            nn.init.uniform_(self.up, -1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
            nn.init.uniform_(self.up_bias, -0.1, 0.1)

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor | None = None
    ) -> torch.Tensor:
        z = (base_out if self.series else x).to(self.down.dtype)
        n, r, d_z = self.down.shape
        h = self.activation(
            nn.functional.linear(self.dropout(z), self.down.reshape(n * r, d_z), self.down_bias.flatten())
        )
        gate = (weights * self.scaling).to(h.dtype)
        h = (h.unflatten(-1, (n, r)) * gate.unsqueeze(-1)).flatten(-2)
        delta = h @ self.up.reshape(n * r, -1) + gate @ self.up_bias
        return base_out + delta.to(base_out.dtype)

    def soft_merged_delta(self, x, base_out, g, lora_mode):
        """``s (U_b^T act(D_b z + b_b) + c_b)`` with every parameter merged per sequence."""
        z = self.dropout((base_out if self.series else x).to(self.down.dtype))
        down, down_bias, up, up_bias = (merge_stacked(p, g) for p in (self.down, self.down_bias, self.up, self.up_bias))
        h = self.activation(z @ down.transpose(1, 2) + down_bias.unsqueeze(1))
        return (h @ up + up_bias.unsqueeze(1)) * self.scaling

    def slot_deltas(self, xs, zs):
        """``s (u_e(act(D_e z̃ + b_e)) + c_e)``; ``z̃`` is the slot's input (parallel) or its base output (series)."""
        z = zs if self.series else xs
        h = self.activation(torch.einsum("bnpz,nrz->bnpr", z, self.down) + self.down_bias[:, None, :])
        return (torch.einsum("bnpr,nro->bnpo", h, self.up) + self.up_bias[:, None, :]) * self.scaling

    def fold_blocker(self) -> str | None:
        return "bottleneck adapters are nonlinear, so they cannot be folded into a weight"
