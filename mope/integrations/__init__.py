"""Trainers mope did not write: ``transformers.Trainer`` logs (:mod:`.trainer`), ``MoPETrainer`` (:mod:`.hf_trainer`),
TRL's SFT, DPO, KTO, Reward, GRPO and RLOO trainers (:mod:`.trl`), and ZeRO-3 gathering (:mod:`.deepspeed`).

``mope.integrations.trl`` needs the ``trl`` extra and is imported only when asked for.
"""

from .trainer import RoutingLogCallback, head_only, log_routing

__all__ = ["RoutingLogCallback", "head_only", "log_routing"]
