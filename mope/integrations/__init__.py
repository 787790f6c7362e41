"""Trainers mope did not write: ``transformers.Trainer`` logs (:mod:`.trainer`) and TRL's SFTTrainer (:mod:`.trl`).

``mope.integrations.trl`` needs the ``trl`` extra and is imported only when asked for.
"""

from .trainer import RoutingLogCallback, head_only, log_routing

__all__ = ["RoutingLogCallback", "head_only", "log_routing"]
