"""Diverged training (issue 16): a NaN/inf loss stops the loop (or skips the step), NaN/inf adapter
weights are never saved, and an aux loss larger than the task loss is warned about once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mope.training.loop import MAX_CONSECUTIVE_SKIPS, Run, TrainingDiverged, adapter_checksum, run
from mope.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"
QUICK = ["training.epochs=null", "data.max_examples=64", "training.eval_every=null", "training.save_every=null"]


def recipe(out: Path, *overrides: str):
    return load_recipe(TINY, [f"training.output_dir={out}", *QUICK, *overrides])


def poisoned_run(out: Path, steps: set[int], which: str, *overrides: str) -> tuple[Run, list[float]]:
    """A set-up run whose training forwards at ``steps`` (1-based) get a NaN task or aux loss.

    Returns the run and the adapter checksum seen by every training forward, to tell which steps
    changed the weights.
    """
    job = Run(recipe(out, *overrides))
    job.setup()
    seen: list[float] = []

    def poison(module, args, output):
        if not module.training:
            return None
        seen.append(float(adapter_checksum(module)))
        if len(seen) in steps:
            nan = torch.tensor(float("nan"))
            if which == "aux":
                output["aux_loss"] = output["aux_loss"] * nan
            output["loss"] = output["loss"] * nan  # NaN gradients too, as a real divergence gives
        return output

    job.model.register_forward_hook(poison)
    return job, seen


def test_on_nonfinite_loss_is_stop_by_default_and_checked(tmp_path):
    assert recipe(tmp_path).training.on_nonfinite_loss == "stop"
    assert recipe(tmp_path, "training.on_nonfinite_loss=skip").training.on_nonfinite_loss == "skip"
    with pytest.raises(RecipeError, match=r"training\.on_nonfinite_loss: Input should be 'stop' or 'skip'"):
        recipe(tmp_path, "training.on_nonfinite_loss=ignore")


def test_a_diverging_run_stops_at_the_first_infinite_loss_and_saves_nothing_after(tmp_path):
    # learning rate 2000: the router z-loss reaches inf at step 4 (before: the run exited 0 with NaN weights)
    with pytest.raises(TrainingDiverged) as error:
        run(recipe(tmp_path, "training.learning_rate=2000", "training.max_steps=10", "training.save_every=2"))
    message = str(error.value)
    assert "the aux loss (router losses) was NaN or inf at optimizer step 4 (on 1 of 1 processes" in message
    assert "learning rate 1750, routers 1750" in message
    assert f"last checkpoint: {tmp_path / 'checkpoints' / 'step-2'}" in message
    for fix in ("training.learning_rate", "training.max_grad_norm", "float32", "aux_loss_coef (now 0.01)"):
        assert fix in message
    assert "training.on_nonfinite_loss=skip" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2"]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "summary.json").exists()
    weights = load_file(tmp_path / "checkpoints" / "step-2" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_a_nan_task_loss_is_named_with_its_optimizer_step(tmp_path):
    # two micro-batches per step; both of step 2 are NaN: one step, one process
    job, seen = poisoned_run(tmp_path, {3, 4}, "task", "training.max_steps=4", "training.gradient_accumulation_steps=2")
    with pytest.raises(
        TrainingDiverged, match=r"the task loss was NaN or inf at optimizer step 2 \(on 1 of 1 proc"
    ) as error:
        job.train()
    assert "aux_loss_coef" not in str(error.value)  # the router coefficients are not the fix here
    assert len(seen) == 4 and job.state.step == 1
    assert all(bool(torch.isfinite(p).all()) for p in job.model.parameters())


def test_skip_drops_the_updates_of_nonfinite_steps_and_counts_them(tmp_path):
    skip = ["training.max_steps=5", "training.warmup_steps=0", "training.on_nonfinite_loss=skip"]
    job, seen = poisoned_run(tmp_path, {2, 3}, "aux", *skip)
    summary = job.finish(job.train())
    assert summary["steps"] == 5 and summary["skipped_steps"] == 2
    assert seen[0] != seen[1] == seen[2] == seen[3] != seen[4]  # steps 2 and 3 changed no weight
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3]
    bundle = load_file(tmp_path / "bundle" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in bundle.values())


def test_skip_gives_up_after_consecutive_nonfinite_steps(tmp_path):
    steps = set(range(2, 20))
    job, seen = poisoned_run(tmp_path, steps, "task", "training.max_steps=10", "training.on_nonfinite_loss=skip")
    with pytest.raises(TrainingDiverged, match=rf"{MAX_CONSECUTIVE_SKIPS} optimizer steps in a row had a NaN/inf loss"):
        job.train()
    assert len(seen) == 1 + MAX_CONSECUTIVE_SKIPS
    assert len(set(seen[1:])) == 1  # no skipped step changed the weights


def test_nonfinite_weights_are_never_saved(tmp_path):
    job = Run(recipe(tmp_path, "training.max_steps=2", "training.save_every=1"))
    job.setup()
    job.save_checkpoint()  # step 0, finite: saved
    name, weight = next((n, p) for n, p in job.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("inf")
    job.state.step = 1
    with pytest.raises(TrainingDiverged, match=rf"after optimizer step 1 adapter weights hold NaN or inf \({name}\)"):
        job.save_checkpoint()
    with pytest.raises(TrainingDiverged, match=r"nothing was saved \(last checkpoint: .*step-0\)"):
        job.finish(0.0)
    assert os.listdir(tmp_path / "checkpoints") == ["step-0"]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "summary.json").exists()


def test_an_aux_loss_larger_than_the_task_loss_is_warned_about_once(tmp_path, caplog):
    # the run: learning rate 10 sends the router z-loss to 1e17 while the task loss stays ~10
    with caplog.at_level(logging.WARNING, logger="mope.training.loop"):
        summary = run(recipe(tmp_path, "training.learning_rate=10", "training.max_steps=12"))
    warnings = [r.getMessage() for r in caplog.records if "dominates" in r.getMessage()]
    assert len(warnings) == 1
    assert "over optimizer steps 1-10" in warnings[0]
    assert "adapter.config.aux_loss_coef (now 0.01) or adapter.config.z_loss_coef (now 0.001)" in warnings[0]
    assert summary["skipped_steps"] == 0


def test_no_warning_while_the_task_loss_dominates_or_before_warmup_ends(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mope.training.loop"):
        run(recipe(tmp_path / "a", "training.max_steps=12"))
        run(
            recipe(
                tmp_path / "b", "training.max_steps=12", "training.warmup_steps=12", "adapter.config.aux_loss_coef=100"
            )
        )
    assert not [r for r in caplog.records if "dominates" in r.getMessage()]


# Rank 1 alone sees a NaN loss at its third training forward: both ranks must stop at step 3 together.
NAN_ON_RANK_1 = """
import sys, torch
from accelerate import PartialState
from mope.training import loop
setup = loop.Run.setup
def poisoned_setup(self):
    setup(self)
    calls = []
    def poison(module, args, output):
        calls.append(1)
        if module.training and PartialState().process_index == 1 and len(calls) == 3:
            output["loss"] = output["loss"] * torch.tensor(float("nan"))
        return output
    self.accelerator.unwrap_model(self.model).register_forward_hook(poison)
loop.Run.setup = poisoned_setup
from mope.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_loss_is_nan(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", str(script), "--recipe", str(TINY)]
    command += [f"training.output_dir={tmp_path / 'out'}", "training.max_steps=6", "training.save_every=null"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert done.returncode != 0
    assert "the task loss was NaN or inf at optimizer step 3 (on 1 of 2 processes" in done.stderr
    assert done.stderr.count("error: Training diverged") == 2  # both ranks (one line each), not one rank and a hang
    assert not (tmp_path / "out" / "bundle").exists()
