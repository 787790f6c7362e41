"""Expert types. Add one: an ``ExpertBank`` subclass in its own file plus one line in ``EXPERT_BANKS``.

The bank class carries everything about its type (see :mod:`mope.experts.base`): its forward,
soft merging, Soft MoE slots, its LoRA form for export, folding into the base weight.
Whole-FFN experts (:class:`FFNExpertBank`) are chosen by the targeted module (a gated MLP block),
not by ``expert_type``.
"""

from __future__ import annotations

from .adapter import ACTIVATIONS, AdapterExpertBank
from .base import ExpertBank
from .ffn import FFNExpertBank
from .ia3 import IA3ExpertBank
from .lora import LoRAExpertBank, SharedALoRAExpertBank

EXPERT_BANKS: dict[str, type[ExpertBank]] = {
    "lora": LoRAExpertBank,
    "lora_shared_a": SharedALoRAExpertBank,
    "adapter": AdapterExpertBank,
    "ia3": IA3ExpertBank,
}

__all__ = [
    "ACTIVATIONS",
    "EXPERT_BANKS",
    "AdapterExpertBank",
    "ExpertBank",
    "FFNExpertBank",
    "IA3ExpertBank",
    "LoRAExpertBank",
    "SharedALoRAExpertBank",
]
