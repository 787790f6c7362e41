"""Dense-to-sparse router schedule, driven by a training step saved with the bundle.

With ``router_schedule_steps = S > 0`` each router starts at ``router_schedule_start_top_k``
and/or ``router_schedule_start_temperature`` and moves linearly to the configured ``top_k`` /
``router_temperature`` over S steps (progress = min(1, step / S)); e.g. start dense (start top-k
= N, or a high temperature) and anneal to sparse top-2 (Nie et al. 2021, "Dense-to-Sparse Gate").

The step is model-level state: a ``long`` buffer in ``MoPEModel.mope_schedule[adapter]``, saved in
the bundle as ``base_model.mope_schedule.step`` and restored by ``PeftModel.from_pretrained``.
A host-side copy of it means no device sync per forward: it is advanced with the buffer and
re-read from it only when a state dict is loaded. The schedule moves its routers (plain Python
attributes) in the same place, :meth:`RouterSchedule.advance` or a load, and nowhere else.

What counts as a step (``router_schedule_counter``):

- ``"forward"`` (default): each training-mode forward of the whole model. Gradient
  accumulation therefore counts micro-batches: use S = optimizer steps * accumulation steps.
- ``"manual"``: only :func:`step_schedule`, called after each ``optimizer.step()``: mope's training
  loop calls it, and :class:`ScheduleCallback` does it for ``transformers.Trainer`` (and TRL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn
from transformers import TrainerCallback

SCHEDULE_COUNTERS = ("forward", "manual")
SAVED_STEP = "base_model.mope_schedule.step"  # the step's key in a bundle, under any adapter name


class RouterSchedule(nn.Module):
    """One adapter's schedule step: the saved buffer ``step`` and its host copy ``count``."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.count = 0
        # The adapter's routers (bind_schedule), in a plain list: they must not become submodules here.
        self.routers: list[nn.Module] = []

    def advance(self) -> None:
        self.step.add_(1)
        self.count += 1
        self.move_routers()

    def progress(self, count: int | None = None) -> float:
        return min(1.0, (self.count if count is None else count) / self.steps)

    def move_routers(self, count: int | None = None) -> None:
        """Give every router of the adapter the progress of step ``count`` (the current step if None)."""
        progress = self.progress(count)
        for router in self.routers:
            router.set_schedule_progress(progress)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        count = int(self.step.item())  # once per load, not per forward
        if count < 0:  # PEFT < 0.21 loads without mope's value checks: the first forward failed far from here
            raise ValueError(f"'{prefix}step' is {count}: a router schedule's step is a non-negative count")
        self.count = count
        self.move_routers()

    def extra_repr(self) -> str:
        return f"steps={self.steps}, step={self.count}"


def attach_schedule(tuner: nn.Module, config: Any, adapter_name: str) -> None:
    """Create the adapter's step buffer (only when it has a schedule: other bundles keep their keys)."""
    if not config.router_schedule_steps:
        return
    if "mope_schedule" not in tuner._modules:
        tuner.mope_schedule = nn.ModuleDict()
    tuner.mope_schedule[adapter_name] = RouterSchedule(config.router_schedule_steps)


def bind_schedule(tuner: Any, adapter_name: str) -> None:
    """After injection: the schedule of ``adapter_name`` moves the routers its layers hold."""
    schedules = schedules_of(tuner)
    if adapter_name not in schedules:
        return
    schedule = schedules[adapter_name]
    schedule.routers = [
        routers[adapter_name]
        for module in tuner.model.modules()
        if isinstance(routers := getattr(module, "mope_router", None), nn.ModuleDict) and adapter_name in routers
    ]
    schedule.move_routers()


def load_saved_step(tuner: nn.Module, adapter_name: str, tensor_file: str) -> None:
    """Set the adapter's step from its bundle file (``base_model.mope_schedule.step``), when both have one.

    For transformers' own ``model.load_adapter``: the tuner is not in that model's module tree, so transformers
    reports the saved step as unexpected and the routers would start the schedule again.
    """
    schedules = schedules_of(tuner)
    with safe_open(tensor_file, framework="pt") as handle:
        if adapter_name in schedules and SAVED_STEP in handle.keys():  # noqa: SIM118
            schedules[adapter_name].load_state_dict({"step": handle.get_tensor(SAVED_STEP)})


def detach_schedule(tuner: nn.Module, adapter_name: str) -> None:
    """Drop a deleted (or failed) adapter's step, so that no bundle of another adapter saves it."""
    schedules = schedules_of(tuner)
    if adapter_name in schedules:
        del schedules[adapter_name]
    if not schedules and "mope_schedule" in tuner._modules:  # the last one: the tuner's modules as before
        del tuner.mope_schedule


def schedules_of(tuner: nn.Module) -> nn.ModuleDict | dict:
    return tuner._modules.get("mope_schedule") or {}


def advance_schedules(tuner: Any, counter: str) -> None:
    """Advance the step of every active adapter whose schedule counts ``counter`` events."""
    schedules = schedules_of(tuner)
    for name in tuner.active_adapters:
        if name in schedules and tuner.peft_config[name].router_schedule_counter == counter:
            schedules[name].advance()


@contextlib.contextmanager
def schedules_at(counts: list[tuple[RouterSchedule, int]]) -> Iterator[None]:
    """The routers as at these steps inside the block, then as now: gradient checkpointing recomputes a forward in
    its backward, after the forward's end advanced the step (it routed with the next step's top_k: 189% off)."""
    moved = [(schedule, count) for schedule, count in counts if schedule.count != count]
    for schedule, count in moved:
        schedule.move_routers(count)
    try:
        yield
    finally:
        for schedule, _ in moved:
            schedule.move_routers()


def step_schedule(model: nn.Module) -> None:
    """Advance the router schedule by one step; call after each ``optimizer.step()``.

    Acts on adapters with ``router_schedule_counter='manual'``; a no-op for the others (and for a
    MoPE model without a schedule), so a training loop may always call it.
    """
    tuner = mope_tuner_of(model)
    if tuner is None:
        raise ValueError(f"mope.step_schedule needs a MoPE model (a PeftModel with a MoPE adapter), got {type(model)}")
    advance_schedules(tuner, "manual")


def mope_tuner_of(model: nn.Module) -> Any:
    """The MoPE tuner of ``model`` (a PeftModel's ``base_model``, or the tuner itself), or the one whose forward hook a
    model carries that loaded a bundle with transformers' own ``load_adapter`` (no tuner is in its module tree);
    None if it has none."""
    tuner = model.base_model if isinstance(model, PeftModel) else model
    return tuner if hasattr(tuner, "routing_context") else tuner_by_hook(model)


def tuner_by_hook(model: nn.Module) -> Any:
    """The MoPE tuner whose forward pre-hook ``model`` carries (every MoPE injection registers one), or None."""
    hooks = getattr(model, "_forward_pre_hooks", {}).values()
    return next((hook.__self__ for hook in hooks if hasattr(getattr(hook, "__self__", None), "routing_context")), None)


class ScheduleCallback(TrainerCallback):
    """Steps the router schedule after each optimizer step of ``transformers.Trainer`` (and TRL's trainers).

    ``Trainer(..., callbacks=[mope.ScheduleCallback()])``; needed for ``router_schedule_counter='manual'``,
    harmless otherwise (``step_schedule`` leaves other adapters alone).
    """

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None:
            step_schedule(model)
