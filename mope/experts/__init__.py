"""Expert types. Add one: an ``nn.Module`` bank in its own file plus one line in ``EXPERT_BANKS``."""

from __future__ import annotations

from torch import nn

from .lora import LoRAExpertBank

EXPERT_BANKS: dict[str, type[nn.Module]] = {
    "lora": LoRAExpertBank,
}

__all__ = ["EXPERT_BANKS", "LoRAExpertBank"]
