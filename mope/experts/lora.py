"""LoRA experts: N low-rank updates stored as two stacked tensors."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..dispatch import resolve_dispatch
from .base import ExpertBank, merge_stacked


def make_dropout(rate: float) -> nn.Module:
    """One dropout for all experts (one mask per layer); none at all when the rate is 0."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class LoRAExpertBank(ExpertBank):
    """All N LoRA experts of one module: expert e adds ``(alpha / r) * B_e^T A_e x``.

    ``lora_A [N, r, d_in]``: expert e's A equals PEFT's ``lora_A.weight``.
    ``lora_B [N, r, d_out]``: expert e's B is PEFT's ``lora_B.weight`` transposed; this layout makes
    ``B_cat`` a free view for the second GEMM.

    Soft merging (per sequence): ``lora_mode="factors"`` (SMEAR's parameter merge) gives
    ``A_b = sum_e g_be A_e``, ``B_b = sum_e g_be B_e``, ``delta = s B_b^T A_b x``: not the mixture of
    outputs (the product of sums has cross terms). ``"delta"`` merges ``dW_b = s sum_e g_be B_e^T A_e``
    ``[batch, d_out, d_in]``: exactly the mixture of the experts' linear maps, at the memory of one
    full weight per sequence.
    """

    soft_merge = "sequence"
    soft_tokens = True
    exports_lora = True

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__(in_features, out_features, config, num_experts)
        self.r = config.r
        self.scaling = config.lora_alpha / config.r
        self.dropout = make_dropout(config.lora_dropout)
        # How gate weights reach the experts (mope.dispatch; a runtime setting, not saved), and how
        # many experts a token uses at most (the layer sets it from its router; N = dense: masked).
        self.dispatch: str = getattr(config, "dispatch", "auto")
        self.active_experts: int = num_experts
        self.lora_A = nn.Parameter(torch.empty(num_experts, config.r, in_features))
        self.lora_B = nn.Parameter(torch.empty(num_experts, config.r, out_features))
        self.reset_parameters(config.init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        for a in self.lora_A.data:  # per expert, as nn.Linear / PEFT LoRA do for one A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.lora_B)
        else:
            bound = 1.0 / math.sqrt(self.r)
            nn.init.uniform_(self.lora_B, -bound, bound)

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        strategy = resolve_dispatch(self.dispatch, x, self.lora_A, self.active_experts)
        return strategy.apply(x, self.lora_A, self.lora_B, weights, self.scaling, base_out, chosen)

    def soft_merged_delta(self, x, base_out, g, lora_mode):
        x = self.dropout(x.to(self.lora_A.dtype))
        if lora_mode == "delta":  # one GEMM over the stacked ranks: (g (x) 1_r * B_cat)^T A_cat
            n, r, d_in = self.lora_A.shape
            scaled_b = self.lora_B * (g.to(self.lora_B.dtype) * self.scaling)[:, :, None, None]  # [batch, N, r, d_out]
            delta = scaled_b.flatten(1, 2).transpose(1, 2) @ self.lora_A.reshape(n * r, d_in)
            return x @ delta.transpose(1, 2)
        a, b = merge_stacked(self.lora_A, g), merge_stacked(self.lora_B, g)  # [batch, r, d_in], [batch, r, d_out]
        return (x @ a.transpose(1, 2)) @ b * self.scaling

    def soft_merged_lora(self, g, lora_mode):
        """``lora_mode="factors"``: ``A_g = sum_e g_e A_e``, ``B_g = s sum_e g_e B_e`` (transposed): rank r,
        the cross terms included, as :meth:`soft_merged_delta` applies them. ``"delta"`` is the mixture: None."""
        if lora_mode == "delta":
            return None
        g = g.to(self.lora_A.device, torch.float64)
        a = torch.einsum("n,nri->ri", g, self.lora_A.double())
        b = torch.einsum("n,nro->or", g * self.scaling, self.lora_B.double())
        return a, b

    def slot_deltas(self, xs, zs):
        h = torch.einsum("bnpi,nri->bnpr", xs, self.lora_A)
        return torch.einsum("bnpr,nro->bnpo", h, self.lora_B) * self.scaling

    def lora_factors(self, u):
        """Stacked experts: A_cat [N·r, d_in], each expert's B scaled by ``s u_e``: rank N·r."""
        n, r, d_in = self.lora_A.shape
        scaled_b = self.lora_B.double() * (u * self.scaling)[:, None, None]
        return self.lora_A.double().reshape(n * r, d_in), scaled_b.reshape(n * r, -1).T

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """``[d_out, d_in]`` update for input-independent gate weights ``[N]`` (nn.Linear layout)."""
        scaled_b = self.lora_B * (weights.to(self.lora_B.dtype) * self.scaling)[:, None, None]
        return torch.einsum("nro,nri->oi", scaled_b, self.lora_A)

    def fold_into(self, weight, bias, weights, sign=1):
        return weight + sign * self.delta_weight(weights).to(weight.dtype), bias

    def extra_repr(self) -> str:
        n, r, d_in = self.lora_A.shape
        return (
            f"num_experts={n}, r={r}, in_features={d_in}, out_features={self.lora_B.shape[-1]}, "
            f"dispatch={self.dispatch}"
        )


class SharedALoRAExpertBank(ExpertBank):
    """HydraLoRA-style experts: one shared ``A [r, d_in]``, N heads ``B [N, r, d_out]``.

    ``delta = s * sum_e g_e B_e^T (A x) = s * B_cat ((g (x) 1_r) * (1_N (x) A x))``: one small GEMM
    for A, one for B_cat; A's cost does not grow with N. Merging the B heads is exact in both
    soft-merge modes (``sum_e g_e B_e^T A = B_b^T A``), and the collapse to one LoRA has rank r.
    """

    soft_merge = "sequence"
    soft_tokens = True
    exports_lora = True

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__(in_features, out_features, config, num_experts)
        self.r = config.r
        self.scaling = config.lora_alpha / config.r
        self.dropout = make_dropout(config.lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.empty(num_experts, config.r, out_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.uniform_(self.lora_B, -1.0 / math.sqrt(self.r), 1.0 / math.sqrt(self.r))

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = nn.functional.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        gate = (weights * self.scaling).to(h.dtype)
        mixed = (gate.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
        delta = mixed @ self.lora_B.reshape(-1, self.out_features)
        return base_out + delta.to(base_out.dtype)

    def soft_merged_delta(self, x, base_out, g, lora_mode):
        x = self.dropout(x.to(self.lora_A.dtype))
        b = merge_stacked(self.lora_B, g)
        if lora_mode == "delta":
            return x @ (b.transpose(1, 2) @ self.lora_A * self.scaling).transpose(1, 2)
        return (x @ self.lora_A.T) @ b * self.scaling

    def slot_deltas(self, xs, zs):
        return torch.einsum("bnpr,nro->bnpo", xs @ self.lora_A.T, self.lora_B) * self.scaling

    def lora_factors(self, u):
        """One shared A: the update is ``(s sum_e u_e B_e)^T A``, rank r whatever N."""
        b = torch.einsum("n,nro->or", u * self.scaling, self.lora_B.double())
        return self.lora_A.double(), b

    def fold_into(self, weight, bias, weights, sign=1):
        b = torch.einsum("n,nro->ro", weights.to(self.lora_B.dtype) * self.scaling, self.lora_B)
        return weight + sign * (b.T @ self.lora_A).to(weight.dtype), bias
