"""TRL's trainers with MoPE's router losses in the loss they optimise.

    from mope.integrations.trl import MoPESFTTrainer       # or MoPEDPOTrainer, MoPERewardTrainer, MoPEGRPOTrainer, ...
    trainer = MoPESFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., peft_config=mope.MoPEConfig(...))

Why subclasses: MoPE adds its router losses (``aux_loss``) to the model output's ``loss``, which is
what ``transformers.Trainer`` optimises. TRL's trainers (1.x) compute the loss themselves (SFT
from a fused LM head's log-probabilities, DPO/KTO from preference log-ratios, the reward model
from pairwise scores, GRPO/RLOO from advantages) and add a router loss only for models whose
config declares ``output_router_logits`` (MoE architectures). Under a plain TRL trainer a MoPE
mixture therefore trains *without* its balance loss. Each subclass here adds the mean ``aux_loss``
of the forwards that ran with gradients during ``compute_loss`` (TRL's no-grad forwards for
metrics, reference log-probabilities or generation are not counted), divided by the accumulation
steps where the Trainer will not divide the loss by them (TRL's own rule for an MoE model's router
loss). Each also logs the router loss and the expert balance
(:class:`~mope.integrations.trainer.RoutingLogCallback`) and steps manual router schedules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..extras import require_extra
from ..routing.schedule import ScheduleCallback, schedules_of
from .trainer import accumulation_divisor, log_routing

require_extra("trl", "trl")
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer  # noqa: E402


def model_returns_own_loss(trainer: Any) -> bool:
    """True where SFTTrainer optimises the model's own ``loss`` (DeepSpeed sequence parallelism), which holds the aux loss."""
    config = getattr(trainer.accelerator, "parallelism_config", None)
    return bool(config is not None and getattr(config, "sp_enabled", False) and trainer.model.training)


def copy_adapter_buffers(model: nn.Module, source: str, target: str) -> None:
    """Give adapter ``target`` the buffers of ``source`` (its schedule step, Arrow's prototypes), as TRL gives a
    reference adapter copied from the policy its parameters only: the reference routed with the schedule's start."""
    buffers = dict(model.named_buffers())
    for name, buffer in buffers.items():
        copy = name.replace(f".{source}.", f".{target}.")
        if copy != name and copy in buffers:
            buffers[copy].copy_(buffer)
    schedules = schedules_of(getattr(model, "base_model", model))
    if target in schedules:
        schedule = schedules[target]
        schedule.count = int(schedule.step.item())
        schedule.move_routers()


def refuse_wrapped_packing(trainer_args: Any, configs: list[Any]) -> None:
    """Refuse SFTConfig's ``packing_strategy="wrapped"`` for sequence-level routing.

    It cuts the examples into rows of ``max_length`` tokens with an attention mask of ones and no
    ``position_ids``: nothing in a batch shows where examples meet (the other packings restart
    ``position_ids``, which the forward refuses), and one decision would pool each row's pieces.
    """
    wrapped = getattr(trainer_args, "packing", False) and getattr(trainer_args, "packing_strategy", None) == "wrapped"
    if not wrapped:  # padding_free too: its position_ids restart per wrapped row, not per example
        return
    names = [name for name, config in configs if getattr(config, "routing_level", None) == "sequence"]
    if names:
        raise ValueError(
            f"MoPE adapter '{names[0]}' routes per sequence (routing_level='sequence'), but SFTConfig(packing=True, "
            "packing_strategy='wrapped') glues several examples into each row with nothing to show where they meet, "
            "so one decision would pool them all. Use packing=False, or route per token."
        )


class RouterLosses:
    """Mixin for a TRL trainer: its optimised loss includes MoPE's router losses; see the module doc."""

    def __init__(self, *args: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        configs = [("default", kwargs.get("peft_config")), *getattr(model, "peft_config", {}).items()]
        refuse_wrapped_packing(kwargs.get("args", args[1] if len(args) > 1 else None), configs)
        super().__init__(*args, **kwargs)
        # a PeftModel given to DPO/KTO/GRPO/RLOO: TRL adds a frozen "ref" adapter and copies the policy's parameters
        if "ref" in getattr(self.model, "peft_config", {}) and adapter_name in self.model.peft_config:
            with torch.no_grad():
                copy_adapter_buffers(self.model, adapter_name, "ref")
        self.routing_log = log_routing(self, adapter_name)
        self.add_callback(ScheduleCallback())

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch=None):
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
        aux = torch.stack([a.to(loss.device) for a in aux_losses]).mean()  # GRPO runs a batch in chunks
        loss = loss + aux / accumulation_divisor(self, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss


class MoPESFTTrainer(RouterLosses, SFTTrainer):
    """``trl.SFTTrainer`` whose optimised loss includes MoPE's router losses."""


class MoPEDPOTrainer(RouterLosses, DPOTrainer):
    """``trl.DPOTrainer`` whose optimised loss includes MoPE's router losses (the reference pass, with the adapter
    disabled or a separate model, runs without gradients and adds none)."""


class MoPEKTOTrainer(RouterLosses, KTOTrainer):
    """``trl.KTOTrainer`` whose optimised loss includes MoPE's router losses."""


class MoPERewardTrainer(RouterLosses, RewardTrainer):
    """``trl.RewardTrainer`` whose optimised loss includes MoPE's router losses (``task_type="SEQ_CLS"``)."""


class MoPEGRPOTrainer(RouterLosses, GRPOTrainer):
    """``trl.GRPOTrainer`` whose optimised loss includes MoPE's router losses. Its generation runs the routers as
    in inference (:func:`mope.routing.context.generate_with_routing`), although the model is in training mode."""


class MoPERLOOTrainer(RouterLosses, RLOOTrainer):
    """``trl.RLOOTrainer`` whose optimised loss includes MoPE's router losses."""
