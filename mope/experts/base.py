"""The ``ExpertBank`` interface: all N experts of one module, applied in one computation."""

from __future__ import annotations

import torch
from torch import nn


class ExpertBank(nn.Module):
    """Base class of expert types. A bank holds all experts of one module as stacked tensors.

    The layer calls, per forward, ``scale_input`` (only if ``scales_input``) before the base
    module and ``forward`` after it. ``weights [..., N]`` are the gate weights over all N experts
    (shared experts included, with weight 1), zero for experts a token does not use.
    """

    scales_input: bool = False

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def scale_input(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Input to give the base module (experts that act before it, e.g. (IA)³ on FFN inputs)."""
        return x

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The module's output given its input ``x`` and the base module's output."""
        raise NotImplementedError

    def forward_merged(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, lora_mode: str = "factors"
    ) -> torch.Tensor:
        """The output with the experts' parameters merged by per-sequence ``weights`` (router='soft_merge')."""
        from ..merging import merged_forward  # merging imports the expert types

        return merged_forward(self, x, base_out, weights, lora_mode)

    def merge_blocker(self) -> str | None:
        """Why this expert type can never be folded into the base weight, or None if it can."""
        return None

    def merge_into(
        self, weight: torch.Tensor, bias: torch.Tensor | None, weights: torch.Tensor, sign: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Base ``weight [d_out, d_in]`` and ``bias`` with (sign=1) or without (sign=-1) the experts folded in,
        for input-independent gate weights ``[N]``."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
