"""TRL's ``SFTTrainer`` with MoPE's router losses in the loss it optimises.

    from mope.integrations.trl import MoPESFTTrainer
    trainer = MoPESFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., peft_config=mope.MoPEConfig(...))

Why a subclass: MoPE adds its router losses (``aux_loss``) to the model output's ``loss``, which is
what ``transformers.Trainer`` optimises. TRL's ``SFTTrainer`` (1.x) computes the loss itself, from
a fused LM head's log-probabilities (or from the logits, with label smoothing or a
``compute_loss_func``), and adds a router loss only for models whose config declares
``output_router_logits`` (MoE architectures). Under a plain ``trl.SFTTrainer`` a MoPE mixture
therefore trains *without* its balance loss. This subclass adds the ``aux_loss`` of the forwards
that ran with gradients during ``compute_loss`` (TRL's extra no-grad forwards for metrics are not counted), divided by the accumulation steps exactly as TRL
divides an MoE model's own router loss. It also logs the router loss and the expert balance
(:class:`~mope.integrations.trainer.RoutingLogCallback`) and steps manual router schedules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..extras import require_extra
from ..routing.schedule import ScheduleCallback
from .trainer import log_routing

require_extra("trl", "trl")
from trl import SFTTrainer  # noqa: E402


def model_returns_own_loss(trainer: SFTTrainer) -> bool:
    """True where SFTTrainer optimises the model's own ``loss`` (DeepSpeed sequence parallelism), which holds the aux loss."""
    config = getattr(trainer.accelerator, "parallelism_config", None)
    return bool(config is not None and getattr(config, "sp_enabled", False) and trainer.model.training)


class MoPESFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose optimised loss includes MoPE's router losses; see the module doc."""

    def __init__(self, *args: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routing_log = log_routing(self, adapter_name)
        self.add_callback(ScheduleCallback())

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        aux_losses: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple, output: Any) -> None:
            aux = output.get("aux_loss") if hasattr(output, "get") else None
            if aux is not None and aux.requires_grad:
                aux_losses.append(aux)

        handle = self.model.register_forward_hook(record)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if not aux_losses or model_returns_own_loss(self):  # no training forward, or its loss holds the aux
            return result
        loss = result[0] if return_outputs else result
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + sum(aux.to(loss.device) for aux in aux_losses) / steps
        return (loss, result[1]) if return_outputs else loss
