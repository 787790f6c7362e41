"""Soft merging gate (SMEAR, Muqeeth et al. 2023; MoV, Zadouri et al. 2023).

The gate is a plain softmax over all experts, but instead of mixing the experts' *outputs* its
probabilities merge the experts' *parameters* into one expert per sequence (each expert bank's
``soft_merged_delta``),
which then runs on the sequence's tokens: one expert's compute per token instead of N.

LoRA and bottleneck adapters merge once per sequence, so they need ``routing_level='sequence'``
(the router sees the masked mean-pool of the layer input) or ``'task'``; (IA)³ merges its
vectors per token (``g L``, exact and cheap), at any level. LoRA merges its factors or its
``ΔW`` (``MoPEConfig.soft_merge_lora``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_choice
from ..experts import EXPERT_BANKS
from .base import Router, Routing, RoutingInputs

SOFT_MERGE_LORA_MODES = ("factors", "delta")


class SoftMergeRouter(Router):
    """``g = softmax(W x / T)`` over all experts; the bank applies ``sum_e g_e theta_e`` (``top_k`` is ignored)."""

    sparse_weights = False
    schedules_top_k = False
    applies_experts = True

    def __init__(self, in_features: int, num_experts: int, top_k: int, config: Any) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.lora_mode = config.soft_merge_lora

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_choice("MoPEConfig", "soft_merge_lora", config.soft_merge_lora, SOFT_MERGE_LORA_MODES)

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        """The expert type must merge; per-sequence merges need a sequence or task level; no shared experts."""
        c = config
        merges = EXPERT_BANKS[c.expert_type].soft_merge
        if merges is None:
            supported = sorted(name for name, bank in EXPERT_BANKS.items() if bank.soft_merge is not None)
            raise ValueError(
                f"MoPEConfig.expert_type={c.expert_type!r} cannot be soft-merged; router='soft_merge' supports {supported}"
            )
        if merges == "sequence" and c.routing_level == "token":
            raise ValueError(
                f"MoPEConfig.routing_level='token' with router='soft_merge' and expert_type={c.expert_type!r}: the "
                "experts' parameters are merged once per sequence, so set routing_level='sequence' (the gate reads the "
                "masked mean-pool of the layer input) or 'task'. Expert types that merge per token: "
                f"{sorted(name for name, bank in EXPERT_BANKS.items() if bank.soft_merge == 'token')}."
            )
        if c.num_shared_experts:
            raise ValueError(
                "MoPEConfig.num_shared_experts must be 0 with router='soft_merge': the merge weights are the gate's "
                "probabilities, which sum to 1 over the routed experts"
            )

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        return Routing(weights=probs, probs=probs, logits=logits, load=probs)

    def apply_experts(self, bank, x, base_out, routing, weights):
        return bank.forward_soft_merged(x, base_out, weights, lora_mode=self.lora_mode)

    def merged_lora(self, bank, weights):
        """The merged expert of a constant gate, e.g. a task pinned by ``mope.fix_task``: with LoRA experts and
        ``soft_merge_lora='factors'`` the rank-r LoRA ``(sum g A, s sum g B)``, not the mixture of updates."""
        return bank.soft_merged_lora(weights, self.lora_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", soft_merge_lora={self.lora_mode}"
