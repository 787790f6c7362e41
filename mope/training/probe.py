"""LP-FT: a linear probe trains the task head first, then the adapters join (``training.linear_probe_steps``).

Fine-tuning from a randomly initialised head can destroy what the frozen features carry before the
head has learnt anything ("Fine-Tuning can Distort Pretrained Features", Kumar et al. 2022): on
the 47-class multi-domain task a LoRA and a mixture sat at chance from a random head, and trained
normally from a probed one (docs/when_to_use_a_mixture.md, "Amendment"). With ``P`` probe steps
the run is ``P`` optimizer steps that train the head alone (its own schedule over them), then the
recipe's run (epochs or max_steps, warm-up and schedule) with everything trainable.

One optimizer and one scheduler serve both phases, so checkpoints, resume, DDP, FSDP2 and
DeepSpeed need nothing new: the adapters' and routers' learning rate is 0 during the probe, and
their gradients are dropped before each probe step, so Adam starts their moments when they join
(except under DeepSpeed, which keeps gradients in its own buffers: there the rate alone holds them).
On one process the adapters are also frozen during the probe, so no gradient flows into the
encoder; under DDP/FSDP/DeepSpeed every wrapped parameter must keep receiving gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from ..integrations.trainer import task_head_names
from .recipe import RecipeError, TrainingSection


def head_names(model) -> set[str]:
    """The trainable task-head parameters (PEFT's ``modules_to_save`` copies); a RecipeError when there is none."""
    try:
        return task_head_names(model, "training.linear_probe_steps", "adapter.config.modules_to_save")
    except ValueError as error:
        raise RecipeError(str(error)) from None


def multiplier(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of transformers' schedule ``name`` at each step of a ``total``-step run."""
    throwaway = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(name, throwaway, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]


def probe_then_run(
    optimizer: torch.optim.Optimizer, training: TrainingSection, run_steps: int, heads: list[bool]
) -> LambdaLR:
    """The schedule of ``linear_probe_steps`` + ``run_steps`` optimizer steps; ``heads[i]``: group i is the head.

    The head follows the recipe's schedule over the probe (no warm-up), then every group follows
    it over the run (warm-up included); the other groups stay at 0 during the probe.
    """
    probe_steps = training.linear_probe_steps
    probe = multiplier(training.scheduler, 0, probe_steps)
    run = multiplier(training.scheduler, training.warmup_steps, run_steps)

    def factor(is_head: bool) -> Callable[[int], float]:
        def at(step: int) -> float:
            if step < probe_steps:
                return probe(step) if is_head else 0.0
            return run(step - probe_steps)

        return at

    return LambdaLR(optimizer, [factor(h) for h in heads])


class ProbePhase:
    """What the loop does differently during the probe: which gradients to drop, what to freeze."""

    def __init__(self, optimizer: torch.optim.Optimizer, training: TrainingSection, accelerator: Accelerator) -> None:
        self.steps = training.linear_probe_steps
        self.optimizer = optimizer
        # Only a single process may stop gradients at the head: DDP's reducer, FSDP2 and DeepSpeed
        # expect a gradient for every parameter they were given.
        self.can_freeze = accelerator.distributed_type == DistributedType.NO

    @property
    def others(self) -> list[torch.nn.Parameter]:
        """Every parameter group's but the head's (``parameter_groups`` marks it), read when used: FSDP2's
        ``prepare`` puts sharded parameters in the optimizer's groups in place of those it was built with."""
        return [p for g in self.optimizer.param_groups if not g.get("head") for p in g["params"]]

    def active(self, completed_steps: int) -> bool:
        """Whether the next optimizer step is a probe step."""
        return completed_steps < self.steps

    def enter(self, completed_steps: int) -> None:
        """Freeze the adapters for the probe's remaining steps (one process), or unfreeze them after it."""
        if self.can_freeze:
            for p in self.others:
                p.requires_grad_(not self.active(completed_steps))

    def drop_gradients(self) -> None:
        """Before a probe step: no gradient for the adapters, so the optimizer keeps no state for them yet."""
        for p in self.others:
            p.grad = None
