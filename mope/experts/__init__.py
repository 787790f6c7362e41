"""Expert types. Add one: an ``ExpertBank`` subclass in its own file plus one line in ``EXPERT_BANKS``."""

from __future__ import annotations

from .adapter import ACTIVATIONS, AdapterExpertBank
from .base import ExpertBank
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
    "IA3ExpertBank",
    "LoRAExpertBank",
    "SharedALoRAExpertBank",
]
