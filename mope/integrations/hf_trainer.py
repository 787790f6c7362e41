"""``transformers.Trainer`` with MoPE's router losses in the loss it optimises, whoever computes that loss.

    from mope.integrations.hf_trainer import MoPETrainer
    trainer = MoPETrainer(model=peft_model, args=TrainingArguments(..., label_smoothing_factor=0.1), ...)

A plain ``Trainer`` optimises the model output's ``loss``, which holds MoPE's ``aux_loss``, except
where it computes the loss itself from the logits: with ``label_smoothing_factor`` or a
``compute_loss_func`` it takes the labels out of the batch, the model returns no loss, and the
router losses are not optimised (the mixture trains without its balance loss). This subclass adds
the ``aux_loss`` there, divided by the accumulation steps where the Trainer will not divide the
loss by them (it then expects ``num_items_in_batch`` normalisation), after the Trainer's world-size
factor (DDP's mean of the gradients then averages it), as TRL does for MoE models. Elsewhere it is
``Trainer``. It also logs the router loss and the expert balance (:func:`~.trainer.log_routing`)
and steps manual router schedules. Needs the ``train`` extra (``Trainer`` imports accelerate).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from ..routing.schedule import ScheduleCallback
from .trainer import accumulation_divisor, log_routing


class MoPETrainer(Trainer):
    """``transformers.Trainer`` whose optimised loss includes MoPE's router losses; see the module doc."""

    def __init__(self, *args: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routing_log = log_routing(self, adapter_name)
        self.add_callback(ScheduleCallback())

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        outside = self.label_smoother is not None or self.compute_loss_func is not None
        if not (outside and "labels" in inputs and model.training):  # the model's loss holds the aux loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if aux is not None and aux.requires_grad:
            loss = loss + aux.to(loss.device) / accumulation_divisor(self, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
