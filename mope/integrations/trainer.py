"""MoPE's router losses and expert balance in ``transformers.Trainer`` (and TRL) logs; LP-FT there.

    trainer = Trainer(model=peft_model, ...)          # or trl.SFTTrainer / mope.integrations.trl.MoPESFTTrainer
    mope.log_routing(trainer)                         # adds aux_loss, expert_load_cv, expert_load_max
    trainer.train()

Between two logging steps the callback keeps, on the device, the sum of the training forwards'
``aux_loss`` and each router's dispatch load (no host copy per step); at each training log it
reads them once, averages them (over processes too, under DDP) and adds to the log:

- ``aux_loss``: mean MoPE router loss per training forward (already weighted by its coefficients);
- ``expert_load_cv``: coefficient of variation of the experts' share of dispatch, mean over routers
  (0 when every expert gets the same share);
- ``expert_load_max``: the largest expert's share times the number of experts, max over routers
  (1 when balanced; ``num_experts`` when one expert takes every token).

Evaluation forwards, and training-mode forwards under ``torch.no_grad`` (TRL's metrics pass), are not counted. ``log_routing`` puts the callback first, so that reporters
(TensorBoard, W&B, the progress bar) see the values; the Trainer's ``log_history`` gets them too.

``head_only(model)`` is the recipes' ``training.linear_probe_steps`` (LP-FT) for a Trainer: inside it
only the classification head trains, so a first Trainer fits the head, then a second trains all::

    with mope.head_only(peft_model):
        Trainer(model=peft_model, args=TrainingArguments(max_steps=P, ...), ...).train()
    Trainer(model=peft_model, args=..., ...).train()      # adapters, routers and the head
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from ..analysis.hooks import RouterHooks, token_mask
from ..routing import Routing, RoutingInputs


class TrainingLoad:
    """Dispatch load of one router over the training forwards since the last log (kept on device)."""

    def __init__(self, router: nn.Module) -> None:
        self.router = router
        self.load: torch.Tensor | None = None

    def update(self, routing: Routing, inputs: RoutingInputs) -> None:
        if not self.router.training or not torch.is_grad_enabled():  # counted: the forwards that train
            return
        load = routing.load.detach().float() * token_mask(routing, inputs).unsqueeze(-1)
        load = load.reshape(-1, load.shape[-1]).sum(0)
        self.load = load if self.load is None else self.load + load


# model -> the callback whose hooks are on it: at most one set per model
LOGGING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class RoutingLogCallback(TrainerCallback):
    """Adds ``aux_loss``, ``expert_load_cv`` and ``expert_load_max`` to every training log (see module doc)."""

    def __init__(self, adapter_name: str = "default") -> None:
        self.adapter_name = adapter_name
        self.routers: RouterHooks[TrainingLoad] | None = None
        self.aux_handle = None
        self.aux_sum: torch.Tensor | None = None
        self.aux_count = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self.close()
        if model is None:
            return
        earlier = LOGGING.get(model)  # a run that stopped on an error never reached on_train_end: its hooks stayed
        if earlier is not None:
            earlier.close()
        LOGGING[model] = self
        self.routers = RouterHooks(model, TrainingLoad, self.adapter_name)
        if not self.routers.collectors:
            raise ValueError(
                f"RoutingLogCallback: the model has no MoPE router for adapter '{self.adapter_name}'; pass the "
                "adapter's name (RoutingLogCallback(adapter_name=...)) or leave the callback out."
            )
        self.aux_handle = model.register_forward_hook(self.record_aux)

    def record_aux(self, module: nn.Module, args: tuple, output: Any) -> None:
        trains = module.training and torch.is_grad_enabled()  # not a no-grad metrics forward (TRL's)
        aux = output.get("aux_loss") if trains and hasattr(output, "get") else None
        if aux is not None:
            aux = aux.detach().float()
            self.aux_sum = aux if self.aux_sum is None else self.aux_sum + aux.to(self.aux_sum.device)
            self.aux_count += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any):
        if logs is None or self.routers is None or "loss" not in logs:  # only training logs carry 'loss'
            return
        values = self.read_and_reset()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def read_and_reset(self) -> dict[str, float]:
        """The averages since the last log (summed over processes first), and a fresh start."""
        loads = [c.load for c in self.routers.collectors.values() if c.load is not None]
        device = loads[0].device if loads else (self.aux_sum.device if self.aux_sum is not None else "cpu")
        aux = torch.stack(
            [
                self.aux_sum.to(device) if self.aux_sum is not None else torch.zeros((), device=device),
                torch.tensor(float(self.aux_count), device=device),
            ]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(aux)
            for load in loads:
                dist.all_reduce(load)
        values: dict[str, float] = {}
        if aux[1] > 0:
            values["aux_loss"] = (aux[0] / aux[1]).item()
        if loads:
            shares = [load / load.sum().clamp_min(1e-12) for load in loads]
            values["expert_load_cv"] = torch.stack([(s.std(unbiased=False) / s.mean()) for s in shares]).mean().item()
            values["expert_load_max"] = max((s.max() * s.numel()).item() for s in shares)
        for collector in self.routers.collectors.values():
            collector.load = None
        self.aux_sum, self.aux_count = None, 0
        return values

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.close()

    def close(self) -> None:
        if self.routers is not None:
            self.routers.close()
            self.routers = None
        if self.aux_handle is not None:
            self.aux_handle.remove()
            self.aux_handle = None


def accumulation_divisor(trainer: Any, num_items_in_batch: Any) -> int:
    """The accumulation steps where ``Trainer.training_step`` will not divide the loss by them (its own rule:
    ``loss_is_scaled_for_ga``, else a loss normalised by ``num_items_in_batch``), else 1: what an addition to
    ``compute_loss``'s loss is divided by, so that it weighs the same as in one unaccumulated batch."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func
    return trainer.current_gradient_accumulation_steps if scaled else 1


def log_routing(trainer: Any, adapter_name: str = "default") -> RoutingLogCallback:
    """Add a :class:`RoutingLogCallback` to ``trainer``, first, so every reporter sees its values."""
    callback = RoutingLogCallback(adapter_name)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


HEAD = "modules_to_save"  # PEFT wraps the task head it trains whole (classifier, score) under this name


def task_head_names(
    model: nn.Module, asked_by: str = "head_only", field: str = "the config's modules_to_save"
) -> set[str]:
    """The trainable task-head parameters (PEFT's ``modules_to_save`` copies); a ValueError naming ``asked_by`` when none."""
    names = {n for n, p in model.named_parameters() if p.requires_grad and HEAD in n.split(".")}
    if not names:
        raise ValueError(
            f"{asked_by}: the model has no trainable task head to probe (PEFT trains a head named "
            f"'classifier' or 'score' whole; name this model's head in {field})"
        )
    return names


@contextmanager
def head_only(model: nn.Module) -> Iterator[set[str]]:
    """Inside: only the task head is trainable; every other trainable parameter is frozen, and trainable again after.

    LP-FT for ``transformers.Trainer`` or any loop that builds its optimizer from ``requires_grad``:
    a Trainer created inside trains the head alone (its own optimizer and schedule), so a many-class
    head learns before the adapters move (docs/training.md, "Many classes"). Yields the head's
    parameter names. A model without a head PEFT trains is refused before anything is frozen.
    """
    head = task_head_names(model)
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in head]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield head
    finally:
        for p in frozen:
            p.requires_grad_(True)
