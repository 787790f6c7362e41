"""Soft merging of expert *parameters* (SMEAR, Muqeeth et al. 2023; MoV, Zadouri et al. 2023).

A mixture of outputs runs every expert on every token and mixes the results; a soft merge mixes
the experts' parameters with the gate's probabilities ``g [batch, N]`` once per sequence and runs
the single merged expert on the sequence's tokens. With ``L`` tokens per sequence the expert
compute per token drops from N experts to one; the merge itself costs one pass over the bank's
parameters per sequence.

- LoRA, ``"factors"`` (SMEAR's parameter merge): ``A_b = sum_e g_be A_e``, ``B_b = sum_e g_be B_e``,
  ``delta = s B_b^T A_b x``. Not the mixture of outputs (the product of sums has cross terms).
- LoRA, ``"delta"``: ``dW_b = s sum_e g_be B_e^T A_e`` ``[batch, d_out, d_in]``: exactly the mixture
  of the experts' linear maps, at the memory of one full weight per sequence.
- Bottleneck adapters: down/up projections and both biases merged per sequence (SMEAR).
- (IA)³: the gate-weighted vector ``g L`` *is* the merge; the bank already applies it per token.

Every function takes gate weights ``g [batch, N]`` and token states ``[batch, L, d]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .experts.adapter import AdapterExpertBank
from .experts.base import ExpertBank
from .experts.ia3 import IA3ExpertBank
from .experts.lora import LoRAExpertBank, SharedALoRAExpertBank


def merge_stacked(stacked: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_e g[b, e] * stacked[e]`` for ``stacked [N, ...]`` and ``g [batch, N]``: ``[batch, ...]``."""
    return (g.to(stacked.dtype) @ stacked.flatten(1)).reshape(g.shape[0], *stacked.shape[1:])


def merge_lora_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``A_b [batch, r, d_in]`` and ``B_b [batch, r, d_out]`` from ``A [N, r, d_in]``, ``B [N, r, d_out]``."""
    return merge_stacked(lora_A, g), merge_stacked(lora_B, g)


def merge_lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per-sequence ``dW_b = s sum_e g_be B_e^T A_e`` ``[batch, d_out, d_in]`` (nn.Linear layout).

    One GEMM over the stacked ranks: ``(g (x) 1_r * B_cat)^T A_cat``; memory ``batch * d_out * d_in``.
    """
    n, r, d_in = lora_A.shape
    scaled_b = lora_B * (g.to(lora_B.dtype) * scaling)[:, :, None, None]  # [batch, N, r, d_out]
    return scaled_b.flatten(1, 2).transpose(1, 2) @ lora_A.reshape(n * r, d_in)


def apply_lora_factors(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s B_b^T A_b x`` for ``x [batch, L, d_in]``: two batched GEMMs of rank r."""
    return (x @ a.transpose(1, 2)) @ b * scaling


def apply_delta(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``dW_b x`` for ``x [batch, L, d_in]``, ``delta [batch, d_out, d_in]``."""
    return x @ delta.transpose(1, 2)


def merge_adapter(bank: AdapterExpertBank, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sequence ``down [batch, r, d_z]``, ``down_bias [batch, r]``, ``up [batch, r, d_out]``, ``up_bias [batch, d_out]``."""
    return tuple(merge_stacked(p, g) for p in (bank.down, bank.down_bias, bank.up, bank.up_bias))


def apply_adapter(
    z: torch.Tensor, merged: tuple[torch.Tensor, ...], activation: nn.Module, scaling: float
) -> torch.Tensor:
    """``s (U_b^T act(D_b z + b_b) + c_b)`` for ``z [batch, L, d_z]``."""
    down, down_bias, up, up_bias = merged
    h = activation(z @ down.transpose(1, 2) + down_bias.unsqueeze(1))
    return (h @ up + up_bias.unsqueeze(1)) * scaling


# --- per expert type: the merged forward ------------------------------------------------------
# Each takes (bank, x [batch, L, d_in], base_out [batch, L, d_out], g [batch, N], lora_mode) and
# returns the delta [batch, L, d_out] in the bank's dtype.


def lora_merged_delta(bank: LoRAExpertBank, x, base_out, g, lora_mode: str) -> torch.Tensor:
    x = bank.dropout(x.to(bank.lora_A.dtype))
    if lora_mode == "delta":
        return apply_delta(x, merge_lora_delta(bank.lora_A, bank.lora_B, g, bank.scaling))
    return apply_lora_factors(x, *merge_lora_factors(bank.lora_A, bank.lora_B, g), bank.scaling)


def shared_a_merged_delta(bank: SharedALoRAExpertBank, x, base_out, g, lora_mode: str) -> torch.Tensor:
    """One shared A: merging the B heads is exact in both modes (``sum_e g_e B_e^T A = B_b^T A``)."""
    x = bank.dropout(x.to(bank.lora_A.dtype))
    b = merge_stacked(bank.lora_B, g)
    if lora_mode == "delta":
        return apply_delta(x, b.transpose(1, 2) @ bank.lora_A * bank.scaling)
    return (x @ bank.lora_A.T) @ b * bank.scaling


def adapter_merged_delta(bank: AdapterExpertBank, x, base_out, g, lora_mode: str) -> torch.Tensor:
    z = bank.dropout((base_out if bank.series else x).to(bank.down.dtype))
    return apply_adapter(z, merge_adapter(bank, g), bank.activation, bank.scaling)


MergedDelta = Callable[[ExpertBank, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]

# Expert type -> its merged forward (exact classes; (IA)3 is handled by merged_forward itself).
MERGED_DELTAS: dict[type[ExpertBank], MergedDelta] = {
    LoRAExpertBank: lora_merged_delta,
    SharedALoRAExpertBank: shared_a_merged_delta,
    AdapterExpertBank: adapter_merged_delta,
}


def merged_forward(
    bank: ExpertBank, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, lora_mode: str = "factors"
) -> torch.Tensor:
    """The module's output with the bank's experts merged by ``weights``.

    ``weights [..., N]`` are per-sequence gate weights broadcast over the token dims (routing level
    ``sequence`` or ``task``: equal for all tokens of an example), so the first token's row is the
    example's. (IA)³ takes per-token weights as they are: its merge ``g L`` is one vector per token.
    """
    if isinstance(bank, IA3ExpertBank):
        return bank(x, base_out, weights)
    merged_delta = MERGED_DELTAS.get(type(bank))
    if merged_delta is None:
        raise ValueError(f"router='soft_merge' cannot merge {type(bank).__name__} experts")
    batch = x.shape[0]
    g = weights.reshape(batch, -1, weights.shape[-1])[:, 0]  # [batch, N]: one merge per sequence
    delta = merged_delta(
        bank, x.reshape(batch, -1, x.shape[-1]), base_out.reshape(batch, -1, base_out.shape[-1]), g, lora_mode
    )
    return base_out + delta.reshape(base_out.shape).to(base_out.dtype)


def mergeable_expert_types() -> list[str]:
    """The ``expert_type`` names soft_merge supports (for messages and validation)."""
    from .experts import EXPERT_BANKS

    return sorted(name for name, cls in EXPERT_BANKS.items() if cls in MERGED_DELTAS or cls is IA3ExpertBank)
