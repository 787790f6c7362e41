"""How a gate's weights are applied to an expert bank.

``lora_masked`` is the default: with ``g`` zero for experts a token does not use,

    delta = s * B_cat (g (x) 1_r  *  A_cat x)

where ``A_cat`` stacks all experts' A (inner dim N*r). That is exactly the top-k output, costs
two plain GEMMs, needs no sort and no host sync, and gives unselected experts zero gradient.
It wins while N*r is small against the layer width.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def lora_masked(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``x [..., d_in]``, ``lora_A [N, r, d_in]``, ``lora_B [N, r, d_out]``, ``weights [..., N]``."""
    n, r, d_in = lora_A.shape
    h = F.linear(x, lora_A.reshape(n * r, d_in))
    gate = (weights * scaling).to(h.dtype).unsqueeze(-1)
    h = (h.unflatten(-1, (n, r)) * gate).flatten(-2)
    return h @ lora_B.reshape(n * r, -1)
