"""The accelerate training loop every recipe runs (``accelerate launch -m mope.train``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..analysis import RoutingStats
from ..bundles import save_pretrained
from ..integrations.deepspeed import gather_routers_with_their_layers
from ..routing.schedule import step_schedule
from .data import Collator, id_bounds, load_examples
from .launch import check_folders, checkpoint_steps, earlier_run, latest_checkpoint
from .models import adapter_config, build_model, load_tokenizer, wrap
from .probe import ProbePhase, head_names, probe_then_run
from .recipe import Recipe, RecipeError, TrainingSection
from .sharding import check_sharding, quantized_storage, whole_adapter

logger = get_logger(__name__)

# on_nonfinite_loss="skip" stops after this many non-finite optimizer steps in a row: one bad batch
# is skipped, a run whose every step is NaN has diverged (its weights are usually NaN already).
MAX_CONSECUTIVE_SKIPS = 5
# The aux-dominance warning compares the mean aux and total losses over this many optimizer steps.
DOMINANCE_WINDOW = 10
FIXES = (
    "lower training.learning_rate (and the router's: router_lr_scale / router_learning_rate), set "
    "training.max_grad_norm (e.g. 1.0), train in float32 (model.dtype=float32, training.mixed_precision=no) "
    "rather than bf16/fp16"
)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or adapter weight: the run stops before saving anything from that step on."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resumed run continues at the same batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def parameter_groups(model, recipe: Recipe) -> list[dict]:
    """Adapters, routers (their own learning rate) and, with a linear probe, the task head (``"head": True``)."""
    t = recipe.training
    heads = head_names(model) if t.linear_probe_steps else set()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    router = [p for n, p in trainable if "mope_router" in n]
    others = [p for n, p in trainable if "mope_router" not in n and n not in heads]
    groups = [{"params": others, "lr": t.learning_rate, "weight_decay": t.weight_decay}]
    if router:
        groups.append({"params": router, "lr": t.router_lr, "weight_decay": 0.0})
    if heads:
        head = [p for n, p in trainable if n in heads]
        groups.append({"params": head, "lr": t.learning_rate, "weight_decay": t.weight_decay, "head": True})
    return groups


def adapter_checksum(model) -> torch.Tensor:
    """A float64 fingerprint of the trainable weights of an unsharded model."""
    return checksum(p for p in model.parameters() if p.requires_grad)


def checksum(tensors) -> torch.Tensor:
    """A float64 fingerprint of float tensors, to compare ranks after distributed training."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(t for t in tensors if t.is_floating_point()):
        total += (i + 1) * t.detach().double().cpu().sum()
    return total


# Written into each checkpoint, last: how the run that wrote it split its batches (see Run.resume).
CHECKPOINT_LAYOUT = "mope_checkpoint.json"


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed next-token cross-entropy over its label tokens, and their number (a causal LM's)."""
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return losses.sum(-1), (targets != -100).sum(-1)


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the float tensors holding a NaN or inf (the adapter's, checked before every save)."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class LossGuard:
    """Watches every optimizer step's task and aux losses, summed over micro-batches and processes.

    A NaN/inf loss on any process stops the run (``on_nonfinite_loss="stop"``) or skips that
    step's update on every process ("skip"), so all ranks leave or continue together. An aux loss
    (load balancing + z-loss, already in ``loss``) larger than the task loss over
    ``DOMINANCE_WINDOW`` steps after the warm-up is warned about once: the adapters are then
    trained mostly to please the routers. No absolute threshold on the loss: its scale depends on
    the task, so a large finite loss is only judged against the task loss.
    """

    def __init__(self, accelerator: Accelerator, training: TrainingSection, coefficients: str) -> None:
        self.accelerator = accelerator
        self.checkpoints = os.path.join(training.output_dir, "checkpoints")
        self.policy = training.on_nonfinite_loss
        self.warmup = training.warmup_steps
        self.coefficients = coefficients
        self.sums: torch.Tensor | None = None
        self.window: deque[tuple[float, float]] = deque(maxlen=DOMINANCE_WINDOW)
        self.skipped = self.consecutive = 0
        self.warned = False
        # The last applied step's mean task and aux losses over its micro-batches and processes (logged).
        self.mean_loss = self.mean_aux = math.nan

    def observe(self, out) -> None:
        """Add one micro-batch's losses, on the device (read once per optimizer step)."""
        loss = out.loss.detach().float()
        aux = out.get("aux_loss")
        aux = torch.zeros_like(loss) if aux is None else aux.detach().float().to(loss.device)
        aux_bad = ~torch.isfinite(aux)
        task_bad = ~torch.isfinite(loss) & ~aux_bad  # a non-finite aux loss makes ``loss`` non-finite too
        values = torch.stack([loss, aux, task_bad.float(), aux_bad.float(), torch.ones_like(loss)])
        self.sums = values if self.sums is None else self.sums + values

    def step_is_finite(self, step: int, learning_rates: dict[str, float]) -> bool:
        """At an optimizer step: True to apply it, False to skip it; raises :class:`TrainingDiverged` to stop."""
        loss, aux, task_bad, aux_bad, count = self.sums.unbind()
        flags = torch.stack([task_bad > 0, aux_bad > 0, task_bad + aux_bad > 0]).float()  # per process, not batch
        sums = torch.cat([torch.stack([loss, aux, count]), flags])
        loss, aux, count, task_bad, aux_bad, processes = self.accelerator.reduce(sums, reduction="sum").tolist()
        self.sums = None
        if task_bad or aux_bad:
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
            which = "aux loss (router losses)" if aux_bad else "task loss"
            where = f"on {int(processes)} of {self.accelerator.num_processes} processes"
            rates = ", ".join(f"{name}{' ' if name else ''}{lr:g}" for name, lr in learning_rates.items())
            problem = f"the {which} was NaN or inf at optimizer step {step} ({where}, learning rate {rates})"
            fixes = FIXES + (f", or lower {self.coefficients}" if aux_bad else "")
            checkpoint = latest_checkpoint(self.checkpoints)
            if self.policy == "stop":
                raise TrainingDiverged(
                    f"Training diverged: {problem}. Nothing was saved from this step on (last checkpoint: "
                    f"{checkpoint or 'none'}). To fix: {fixes}; or set training.on_nonfinite_loss=skip to skip "
                    "such steps."
                )
            if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingDiverged(
                    f"Training diverged: {MAX_CONSECUTIVE_SKIPS} optimizer steps in a row had a NaN/inf loss, the "
                    f"last: {problem}. Nothing was saved from this step on (last checkpoint: {checkpoint or 'none'})."
                    f" To fix: {fixes}."
                )
            logger.warning(f"skipped optimizer step {step}: {problem} (training.on_nonfinite_loss=skip)")
            return False
        self.consecutive = 0
        self.mean_loss, self.mean_aux = loss / count, aux / count
        self.watch_dominance(step, self.mean_loss, self.mean_aux)
        return True

    def watch_dominance(self, step: int, loss: float, aux: float) -> None:
        """Warn once when aux > task, i.e. aux > loss / 2: ``loss - aux`` would lose the task loss to rounding
        exactly when aux is huge, so the message gives the two exact numbers."""
        self.window.append((loss, aux))
        if self.warned or not self.coefficients or len(self.window) < DOMINANCE_WINDOW or step <= self.warmup:
            return
        mean_loss = sum(loss for loss, _ in self.window) / DOMINANCE_WINDOW
        mean_aux = sum(aux for _, aux in self.window) / DOMINANCE_WINDOW
        if mean_aux > mean_loss / 2:
            self.warned = True
            logger.warning(
                f"The aux loss dominates the task loss: over optimizer steps {step - DOMINANCE_WINDOW + 1}-{step} it "
                f"averaged {mean_aux:.4g} of a total loss of {mean_loss:.4g}, so the adapters train mostly to "
                f"balance the routers (a diverging router's z-loss grows like this). Lower {self.coefficients}, or "
                "training.learning_rate."
            )


def aux_coefficients(model, recipe: Recipe) -> str:
    """The MoPE loss coefficients, named as recipe keys with their values (empty for a LoRA run)."""
    if recipe.adapter.method != "mope":
        return ""
    config = model.peft_config["default"]
    return f"adapter.config.aux_loss_coef (now {config.aux_loss_coef:g}) or adapter.config.z_loss_coef (now {config.z_loss_coef:g})"


def no_better_than_majority(metrics: dict, training: TrainingSection) -> str:
    """The warning for a classifier whose eval accuracy does not beat always answering the most common label."""
    advice = "a lower training.learning_rate"
    if not training.linear_probe_steps:
        advice = (
            "training.linear_probe_steps (e.g. one epoch's steps: with many classes a random head can drag training "
            f"to chance, docs/training.md 'Many classes'), or {advice}"
        )
    return (
        f"eval accuracy {metrics['eval_accuracy']:.4f} is no better than always answering the most common label "
        f"({metrics['majority_baseline']:.4f}): the run learned nothing that shows on the eval split. Try {advice}."
    )


def dynamo_plugin(training: TrainingSection) -> TorchDynamoPlugin:
    """``training.compile``: accelerate compiles the model in ``prepare`` (inductor, ``compile_mode``), or not at all.

    Given explicitly, so ``accelerate launch --dynamo_backend`` (and ``mope train``'s ``no``) does
    not decide it behind the recipe's back.
    """
    if not training.compile:
        return TorchDynamoPlugin(backend=DynamoBackend.NO)
    return TorchDynamoPlugin(backend=DynamoBackend.INDUCTOR, mode=training.compile_mode)


def check_compile(accelerator: Accelerator, training: TrainingSection) -> None:
    """accelerate keeps the first Accelerator's dynamo plugin for the whole process: refuse a run it would ignore."""
    compiles = accelerator.state.dynamo_plugin.backend != DynamoBackend.NO
    if compiles != training.compile:
        raise RecipeError(
            f"training.compile={str(training.compile).lower()}: an earlier Accelerator in this process set up accelerate "
            f"{'with' if compiles else 'without'} torch.compile, and accelerate keeps that for the whole process; "
            "run this recipe in its own process (mope train, or accelerate launch -m mope.train)."
        )


class Run:
    """One training run; attributes hold what the phases share."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        t = recipe.training
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # The schedule counts optimizer steps (total_steps); accelerate's default would step it once
            # per process at each optimizer step, ending warm-up and decay N times early on N processes.
            step_scheduler_with_optimizer=False,
            dynamo_plugin=dynamo_plugin(t),
        )
        check_compile(self.accelerator, t)
        check_sharding(self.accelerator, t, recipe.model.quantization)
        set_seed(t.seed)
        self.out = t.output_dir
        self.checkpoints = os.path.join(self.out, "checkpoints")
        self.state = TrainState()
        self.log_path = os.path.join(self.out, "metrics.jsonl")

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def setup(self) -> None:
        r, t = self.recipe, self.recipe.training
        check_folders(t)  # also where the run was not started through checked_recipe (accelerate launch)
        if t.overwrite_output_dir and t.resume_from_checkpoint is None and self.main:
            for name in earlier_run(self.out):
                path = os.path.join(self.out, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        self.accelerator.wait_for_everyone()
        self.examples = load_examples(r.data, r.model.task, id_bounds(r.data, adapter_config(r.adapter, r.model.task)))
        self.tokenizer = load_tokenizer(r.model)
        base = build_model(r.model, self.examples.labels, t.seed, quantized_storage(self.accelerator, r.model))
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.tokenizer.pad_token_id
        if t.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The adapter's initial weights depend on the seed alone, not on what building the base drew from the
        # RNG (ZeRO-3 builds it under deepspeed.zero.Init, which draws differently).
        torch.manual_seed(t.seed)
        self.model = wrap(base, r.adapter, r.model.task)
        if (
            self.accelerator.state.deepspeed_plugin is not None
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            gather_routers_with_their_layers(self.model)
        collator = Collator(self.tokenizer, r.data, r.model.task, self.examples.labels)
        # Own generators: starting a loader iterator then draws no number from the global RNG, so
        # a run resumed mid-epoch sees the same dropout masks as an uninterrupted one.
        train_loader = DataLoader(
            self.examples.train,
            batch_size=t.batch_size,
            shuffle=True,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(t.seed),
        )
        eval_loader = DataLoader(
            self.examples.eval,
            batch_size=t.eval_batch_size,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(t.seed),
        )
        # each process draws every num_processes-th batch (accelerate's sharding evens them out)
        batches_per_process = math.ceil(len(train_loader) / self.accelerator.num_processes)
        updates_per_epoch = math.ceil(batches_per_process / t.gradient_accumulation_steps)
        run_steps = t.max_steps or math.ceil(t.epochs * updates_per_epoch)
        self.total_steps = t.linear_probe_steps + run_steps
        groups = parameter_groups(self.model, r)
        self.initial_lrs = [group["lr"] for group in groups]
        optimizer = torch.optim.AdamW(groups)
        if t.linear_probe_steps:
            self.probe = ProbePhase(optimizer, t, self.accelerator)
            scheduler = probe_then_run(optimizer, t, run_steps, [g.get("head", False) for g in optimizer.param_groups])
        else:
            self.probe = None
            scheduler = get_scheduler(
                t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=run_steps
            )
        prepared = self.accelerator.prepare(self.model, optimizer, train_loader, eval_loader, scheduler)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = prepared
        self.accelerator.register_for_checkpointing(self.state)
        self.guard = LossGuard(self.accelerator, t, aux_coefficients(self.accelerator.unwrap_model(self.model), r))
        if self.main:
            os.makedirs(self.out, exist_ok=True)

    def resume(self) -> None:
        target = self.recipe.training.resume_from_checkpoint
        if target is None:
            return
        path = latest_checkpoint(self.checkpoints) if target == "latest" else target
        if path is None:
            self.accelerator.print("resume_from_checkpoint=latest: no checkpoint yet, starting fresh")
            return
        self.accelerator.load_state(path)
        self.convert_data_position(path)
        restored = list(self.scheduler.scheduler.base_lrs)
        self.apply_learning_rates()
        note = (
            ""
            if restored == self.initial_lrs
            else f" (learning rates {restored} in the checkpoint, now {self.initial_lrs})"
        )
        self.accelerator.print(f"resumed from {path} at step {self.state.step}{note}")

    def convert_data_position(self, path: str) -> None:
        """The checkpoint counts the batches each of its processes drew; with another number of processes (and
        the same per-process batch size) the same examples are a different count of this run's batches."""
        layout_file = os.path.join(path, CHECKPOINT_LAYOUT)
        if not os.path.isfile(layout_file):  # written before the layout was recorded
            return
        with open(layout_file) as handle:
            saved = json.load(handle)
        now = self.layout()
        if saved == now:
            return
        drawn = self.state.batch_in_epoch * saved["num_processes"] * saved["batch_size"]  # examples, all processes
        per_batch = now["num_processes"] * now["batch_size"]
        if saved["batch_size"] != now["batch_size"] or drawn % per_batch:
            raise RecipeError(
                f"training.resume_from_checkpoint: '{path}' was written by {saved['num_processes']} process(es) with "
                f"training.batch_size={saved['batch_size']}; this run has {now['num_processes']} with "
                f"{now['batch_size']}, so it cannot continue at the same example: resume with the checkpoint's "
                "batch size (and a number of processes that divides the batches drawn)"
            )
        self.state.batch_in_epoch = drawn // per_batch

    def apply_learning_rates(self) -> None:
        """The recipe's learning rates, at the schedule's step: loading a checkpoint restores its own, and
        resuming with a lower ``training.learning_rate`` (what a diverged run's error advises) kept the old."""
        scheduler = self.scheduler.scheduler  # accelerate's wrapper holds the LambdaLR
        if list(scheduler.base_lrs) == self.initial_lrs:
            return
        scheduler.base_lrs = list(self.initial_lrs)
        rates = [
            base * factor(scheduler.last_epoch)
            for base, factor in zip(self.initial_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, initial, rate in zip(self.optimizer.param_groups, self.initial_lrs, rates, strict=True):
            group["initial_lr"], group["lr"] = initial, rate
        scheduler._last_lr = rates

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def check_weights(self) -> dict[str, torch.Tensor]:
        """Refuse to save NaN/inf adapter weights; returns the adapter's tensors, whole.

        Every process gathers them (FSDP2 shards, ZeRO-3 partitions) and checks the same values, so
        all stop together.
        """
        whole = whole_adapter(self.accelerator.unwrap_model(self.model))
        bad = nonfinite(whole)
        if bad:
            names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingDiverged(
                f"Training diverged: after optimizer step {self.state.step} adapter weights hold NaN or inf "
                f"({names}); nothing was saved (last checkpoint: {latest_checkpoint(self.checkpoints) or 'none'}). "
                f"To fix: {FIXES}."
            )
        return whole

    def save_checkpoint(self) -> None:
        """``checkpoints/step-N``, written as ``step-N.partial`` and renamed once whole: a run killed while saving
        leaves the previous checkpoint as the latest (``latest`` picked the cut-off one and failed)."""
        self.check_weights()
        path = os.path.join(self.checkpoints, f"step-{self.state.step}")
        staged = path + ".partial"
        if self.main and os.path.isdir(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(staged)
        self.accelerator.wait_for_everyone()
        if self.main:
            with open(os.path.join(staged, CHECKPOINT_LAYOUT), "w") as handle:
                json.dump(self.layout(), handle)
            if os.path.isdir(path):  # the same step saved again (a finished run continued): replace it
                shutil.rmtree(path)
            os.replace(staged, path)
            for step in checkpoint_steps(self.checkpoints)[: -self.recipe.training.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.checkpoints, f"step-{step}"), ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def layout(self) -> dict:
        """How this run splits a global batch: a checkpoint's data position counts each process's batches."""
        t = self.recipe.training
        return {"num_processes": self.accelerator.num_processes, "batch_size": t.batch_size}

    def batches(self):
        """Micro-batches from the current data position on, epoch after epoch, until the last optimizer step.

        It stops before drawing a batch it would not train on: the data position saved after the
        last step is then where a run continued to more steps must start.
        """
        while self.state.step < self.total_steps:
            self.train_loader.set_epoch(self.state.epoch)
            loader = self.train_loader
            if self.state.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(loader, self.state.batch_in_epoch)
            for batch in loader:
                self.state.batch_in_epoch += 1
                yield batch
                if self.state.step >= self.total_steps:
                    return
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def train(self) -> float:
        t = self.recipe.training
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.main, desc="train")
        started, tokens, window = time.perf_counter(), 0, time.perf_counter()
        if self.probe:
            self.probe.enter(self.state.step)
        for batch in self.batches():
            with self.accelerator.accumulate(self.model):
                out = self.model(**batch)
                self.guard.observe(out)
                self.accelerator.backward(out.loss)
                if self.accelerator.sync_gradients:
                    applied = self.optimizer_step()
            tokens += int(batch["attention_mask"].sum()) * self.accelerator.num_processes
            if not self.accelerator.sync_gradients:
                continue
            probing = self.probe is not None and self.probe.active(self.state.step)
            self.state.step += 1
            if not applied:  # a skipped step's NaN loss is not logged (json would write a bare NaN)
                self.log({"step": self.state.step, "skipped": True, "lr": self.scheduler.get_last_lr()[0]})
            elif self.recipe.adapter.method == "mope" and not probing:  # counts the routers' optimizer steps
                step_schedule(self.accelerator.unwrap_model(self.model))
            if probing and not self.probe.active(self.state.step):
                self.probe.enter(self.state.step)  # the probe is over: the adapters join
            aux = out.get("aux_loss")
            bar.update(1)
            if applied and (self.state.step % t.log_every == 0 or self.state.step == self.total_steps):
                rate = tokens / max(time.perf_counter() - window, 1e-9)
                record = {
                    "step": self.state.step,
                    "loss": self.guard.mean_loss,
                    "aux_loss": None if aux is None else self.guard.mean_aux,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": round(rate, 1),
                }
                bar.set_postfix(loss=f"{record['loss']:.4f}", aux=f"{record['aux_loss'] or 0:.4f}", tok_s=f"{rate:.0f}")
                self.log(record)
                tokens, window = 0, time.perf_counter()
            if t.eval_every and self.state.step % t.eval_every == 0:
                self.log({"step": self.state.step, **self.evaluate()})
                self.model.train()
            if t.save_every and self.state.step % t.save_every == 0:
                self.save_checkpoint()
        bar.close()
        return time.perf_counter() - started

    def learning_rates(self) -> dict[str, float]:
        """The current learning rate of each parameter group: the adapters' (unnamed), the routers', the head's."""
        groups = self.optimizer.param_groups
        names = ["" if i == 0 else "head" if g.get("head") else "routers" for i, g in enumerate(groups)]
        return dict(zip(names, self.scheduler.get_last_lr(), strict=True))

    def optimizer_step(self) -> bool:
        """Clip, step and zero the gradients, unless a loss was non-finite; False when the step was skipped.

        A skipped step advances ``state.step`` (its data was used) but neither the optimizer, the
        learning-rate schedule nor the router schedule, as Trainer and Megatron do.
        """
        max_grad_norm = self.recipe.training.max_grad_norm
        applied = self.guard.step_is_finite(self.state.step + 1, self.learning_rates())
        if self.probe is not None and self.probe.active(self.state.step):
            self.probe.drop_gradients()
        if applied:
            if max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad()
        return applied

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy (classification) or mean loss over the eval set; with ``training.compile``, uncompiled.

        Uncompiled: eval mode would cost a second compile for one pass, and bitsandbytes repacks 4-bit
        weights in no-grad forwards on CPUs with AVX-512 BF16, which a compiled graph's shapes cannot follow.
        """
        model = getattr(self.model, "_orig_mod", self.model)  # accelerate's torch.compile wrapper, if any
        model.eval()
        correct, count, loss_sum = 0, 0, 0.0
        predictions, targets = [], []
        for batch in self.eval_loader:
            # the repeats masked: they are dropped from the metrics, and must not compete in the real examples'
            # routing either (expert choice, an encoder's eval capacity)
            out = model(**self.without_repeats(batch))
            if self.recipe.model.task == "sequence_classification":
                pred, labels = self.accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
                correct += int((pred == labels).sum())
                count += labels.numel()
                predictions += pred.tolist()
                targets += labels.tolist()
            else:  # per example, so that gather_for_metrics drops the examples repeated to even out processes
                sums, tokens = self.accelerator.gather_for_metrics(token_losses(out.logits, batch["labels"]))
                loss_sum += float(sums.sum())
                count += int(tokens.sum())
        if self.recipe.model.task == "sequence_classification":
            self.predictions = predictions
            majority = max(Counter(targets).values(), default=0) / max(count, 1)
            return {"eval_accuracy": correct / max(count, 1), "majority_baseline": majority}
        return {"eval_loss": loss_sum / max(count, 1)}  # the mean over the eval set's label tokens

    def routing_summary(self, model) -> dict[str, dict]:
        """Expert load per module over the whole eval set: every process's share summed (rank 0's alone before),
        the examples accelerate repeats in the last batch to even out the processes masked out of it."""
        with RoutingStats(model) as stats:
            for batch in self.eval_loader:
                model(**self.without_repeats(batch))
        for accumulator in stats.collectors.values():
            if accumulator.load is None:
                continue
            for name in ("load", "entropy", "tokens", "nonfinite", "dropped", "requested"):
                value = getattr(accumulator, name)
                if value is not None:
                    setattr(accumulator, name, self.accelerator.reduce(value, reduction="sum"))
            accumulator.load_at = accumulator.dropped_at = accumulator.requested_at = None  # lengths differ
        return {name: {"share": s["load"], "cv": s["load_cv"]} for name, s in stats.report().items()}

    def without_repeats(self, batch: dict) -> dict:
        """``batch``, where it is the last and holds examples repeated to even out the processes, with their
        attention mask 0: gathered in process order, the first ``remainder`` rows are the real ones."""
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return batch
        rows = batch["attention_mask"].shape[0]
        keep = min(max(state.remainder - self.accelerator.process_index * rows, 0), rows)
        if keep == rows:
            return batch
        mask = batch["attention_mask"].clone()
        mask[keep:] = 0
        return {**batch, "attention_mask": mask}

    def finish(self, train_seconds: float) -> dict:
        whole = self.check_weights()
        metrics = self.evaluate()
        if self.main and metrics.get("eval_accuracy", 1.0) <= metrics.get("majority_baseline", 0.0):
            logger.warning(no_better_than_majority(metrics, self.recipe.training))
        checksums = self.accelerator.gather(checksum(whole.values()).to(self.accelerator.device)[None]).tolist()
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        load = self.routing_summary(model) if self.recipe.adapter.method == "mope" else {}
        trainable, total = model.get_nb_trainable_parameters()
        summary = {
            **metrics,
            "train_seconds": round(train_seconds, 2),
            "steps": self.state.step,
            "linear_probe_steps": self.recipe.training.linear_probe_steps,
            "skipped_steps": self.guard.skipped,
            "trainable_parameters": trainable,
            "all_parameters": total,
            "rank_checksums": checksums,
            "method": self.recipe.adapter.method,
            "distributed_type": self.accelerator.distributed_type.value,
        }
        if self.main:  # the gathered tensors: under sharding the model itself holds slices
            save_pretrained(model, os.path.join(self.out, "bundle"), state_dict=whole)
            with open(os.path.join(self.out, "routing_summary.json"), "w") as handle:
                json.dump(load, handle, indent=1)
            if getattr(self, "predictions", None) is not None:
                with open(os.path.join(self.out, "predictions.json"), "w") as handle:
                    json.dump({"labels": self.examples.labels, "predictions": self.predictions}, handle)
            with open(os.path.join(self.out, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=1)
        self.accelerator.wait_for_everyone()
        return summary


def run(recipe: Recipe) -> dict:
    """Train a recipe end to end; returns the summary that rank 0 also writes to ``summary.json``."""
    job = Run(recipe)
    job.setup()
    job.resume()
    seconds = job.train()
    if recipe.training.save_every and job.state.step % recipe.training.save_every:  # else the loop saved it last
        job.save_checkpoint()
    return job.finish(seconds)
