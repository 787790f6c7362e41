"""LoRA experts: N low-rank updates stored as two stacked tensors."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..dispatch import lora_masked


class LoRAExpertBank(nn.Module):
    """All N LoRA experts of one module.

    ``lora_A [N, r, d_in]``: expert e's A equals PEFT's ``lora_A.weight``.
    ``lora_B [N, r, d_out]``: expert e's B is PEFT's ``lora_B.weight`` transposed; this layout makes
    ``B_cat`` a free view for the second GEMM. Expert e adds ``(alpha / r) * B_e^T A_e x``.
    """

    def __init__(self, in_features: int, out_features: int, config) -> None:
        super().__init__()
        n, r = config.num_experts, config.r
        self.num_experts, self.r = n, r
        self.scaling = config.lora_alpha / r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(n, r, in_features))
        self.lora_B = nn.Parameter(torch.empty(n, r, out_features))
        self.reset_parameters(config.init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        for a in self.lora_A.data:  # per expert, as nn.Linear / PEFT LoRA do for one A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.lora_B)
        else:
            bound = 1.0 / math.sqrt(self.r)
            nn.init.uniform_(self.lora_B, -bound, bound)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mixture output ``sum_e weights[..., e] * expert_e(x)`` (one dropout mask for all experts)."""
        return lora_masked(self.dropout(x), self.lora_A, self.lora_B, weights, self.scaling)

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """``[d_out, d_in]`` weight update for input-independent gate weights ``[N]`` (nn.Linear layout)."""
        scaled_b = self.lora_B * (weights.to(self.lora_B.dtype) * self.scaling)[:, None, None]
        return torch.einsum("nro,nri->oi", scaled_b, self.lora_A)

    def extra_repr(self) -> str:
        n, r, d_in = self.lora_A.shape
        return f"num_experts={n}, r={r}, in_features={d_in}, out_features={self.lora_B.shape[-1]}"
