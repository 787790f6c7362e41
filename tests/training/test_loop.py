"""The accelerate training loop (mope.training.loop, mope.train): offline runs, DDP on two CPU processes, resume
after SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mope.training.loop import run
from mope.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


OFFLINE_TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]


LAUNCH += ["--dynamo_backend", "no"]


def env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def logged(out: Path) -> list[dict]:
    """The training records of a run's metrics.jsonl (eval records have no "loss")."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "loss" in record]


def test_bad_adapter_config_is_named(tmp_path):
    recipe = load_recipe(OFFLINE_TINY, ["adapter.config.top_k=9", f"training.output_dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"MoPEConfig\.top_k"):
        run(recipe)


@pytest.mark.parametrize("path", [p for p in RECIPES if "offline" in p.parts], ids=lambda p: p.name)
def test_offline_recipes_run_a_few_steps(path, tmp_path):
    overrides = [f"training.output_dir={tmp_path}", "training.max_steps=2", "training.epochs=null"]
    overrides += ["data.max_examples=16", "training.eval_every=null", "training.save_every=null"]
    summary = run(load_recipe(path, overrides))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert (tmp_path / "bundle" / "adapter_model.safetensors").exists()
    assert (tmp_path / "bundle" / "adapter_config.json").exists()
    assert (tmp_path / "metrics.jsonl").read_text().strip()
    if summary["method"] == "mope":
        load = json.loads((tmp_path / "routing_summary.json").read_text())
        assert load and all(abs(sum(v["share"]) - 1) < 1e-5 for v in load.values())


# `-m mope.train`, then each rank writes whether its process group outlived it to its own file (ARGV[1]): the two
# ranks' prints on one stdout once interleaved mid-line ("group alive after main:\ngroup alive after main: False\n False").
GROUP_AFTER_MAIN = """
import os, sys, torch
from mope.train import main
code = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], f"alive{os.environ['RANK']}.txt"), "w") as handle:
    handle.write(str(torch.distributed.is_initialized()))
sys.exit(code)
"""


@pytest.mark.slow
# expert choice ranks every token of the batch: the examples repeated to even out the processes' last eval batch
# competed with the real ones (eval_loss 2e-3 off), and with sorted dispatch a batch of repeats alone crashed the run
@pytest.mark.parametrize(
    "routing",
    [[], ["adapter.config.router=expert_choice", "adapter.config.allow_noncausal_routing=true",
          "adapter.config.dispatch=sorted"]],
    ids=["top_k", "expert_choice"],
)  # fmt: skip
def test_ddp_on_two_cpu_processes_ends_with_identical_weights_and_destroys_its_group(tmp_path, routing):
    script = tmp_path / "train.py"
    script.write_text(GROUP_AFTER_MAIN)
    command = [*LAUNCH, "--multi_gpu", "--num_processes", "2", str(script), str(tmp_path)]
    command += ["--recipe", str(OFFLINE_TINY)]
    # one epoch: as many steps of 2 processes as of 1 process accumulating 2 (the 2 processes counted twice as many)
    length = ["training.max_steps=null", "training.epochs=1", "data.max_examples=128", "training.save_every=null"]
    length += routing
    command += [f"training.output_dir={tmp_path}", *length]
    ran = subprocess.run(
        command, env=env(ACCELERATE_USE_CPU="1"), cwd=ROOT, timeout=600, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert [(tmp_path / f"alive{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rank_checksums"]) == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    # The logged loss is the step's mean over both processes, as one process accumulating the same two batches logs.
    one = tmp_path / "one_process"
    run(load_recipe(OFFLINE_TINY, [f"training.output_dir={one}", *length, "training.gradient_accumulation_steps=2"]))
    alone = json.loads((one / "summary.json").read_text())
    assert summary["steps"] == alone["steps"] == 8  # 16 batches of 8 in the epoch
    two_processes, accumulated = logged(tmp_path), logged(one)
    assert [r["step"] for r in two_processes] == [r["step"] for r in accumulated] == [4, 8]
    for got, want in zip(two_processes, accumulated, strict=True):
        assert (got["loss"], got["aux_loss"]) == pytest.approx((want["loss"], want["aux_loss"]), abs=1e-5)
    # the eval set's mean loss per label token, and its expert load, over both processes' shares of it: rank 0's
    # share alone before, and batch means including the examples repeated to even out the processes
    assert summary["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-5)
    loads = [json.loads((folder / "routing_summary.json").read_text()) for folder in (tmp_path, one)]
    assert loads[0].keys() == loads[1].keys()
    for name, load in loads[1].items():
        assert loads[0][name]["share"] == pytest.approx(load["share"], abs=1e-5), name


# Trains like `-m mope.train`, but SIGKILLs itself right after the step-8 checkpoint is written:
# a kill at a known point of the run, with nothing for tests in the training loop itself.
KILLED_AFTER_STEP_8 = """
import os, signal, sys
from mope.training import loop
save = loop.Run.save_checkpoint
def save_then_die(self):
    save(self)
    if self.state.step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
loop.Run.save_checkpoint = save_then_die
from mope.train import main
sys.exit(main(sys.argv[1:]))
"""


def train_command(out: Path, *extra: str, script: Path | None = None) -> list[str]:
    entry = [str(script)] if script is not None else ["-m", "mope.train"]
    command = [*LAUNCH, "--num_processes", "1", "--cpu", *entry, "--recipe", str(OFFLINE_TINY)]
    return [*command, f"training.output_dir={out}", "training.max_steps=16", "training.save_every=4", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = ["adapter.config.lora_dropout=0.1"]  # RNG state must be restored too
    subprocess.run(train_command(tmp_path / "full", *common), check=True, env=env(), cwd=ROOT, timeout=600)

    out = tmp_path / "killed"
    script = tmp_path / "killed_after_step_8.py"
    script.write_text(KILLED_AFTER_STEP_8)
    killed = subprocess.run(train_command(out, *common, script=script), env=env(), cwd=ROOT, timeout=600)
    assert killed.returncode != 0
    assert (out / "checkpoints" / "step-8").exists() and not (out / "checkpoints" / "step-12").exists()
    assert not (out / "summary.json").exists()

    resumed = train_command(out, *common, "--resume_from_checkpoint", "latest")
    subprocess.run(resumed, check=True, env=env(), cwd=ROOT, timeout=600)
    want = load_file(tmp_path / "full" / "bundle" / "adapter_model.safetensors")
    got = load_file(out / "bundle" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


# 3 micro-batches an epoch; a constant learning rate, so the schedule does not depend on max_steps.
CONTINUED = ["data.max_examples=12", "training.batch_size=4", "training.epochs=null", "training.scheduler=constant"]
CONTINUED += ["training.warmup_steps=0", "training.log_every=1", "adapter.config.lora_dropout=0.1"]


@pytest.mark.parametrize("steps", [2, 3], ids=["mid_epoch", "at_epoch_end"])
def test_a_finished_run_continued_to_more_steps_matches_an_uninterrupted_run(tmp_path, steps):
    """The final checkpoint holds the data position after the last batch trained on, not one batch later."""

    def train(out: Path, max_steps: int, *extra: str) -> None:
        overrides = [*CONTINUED, f"training.output_dir={out}", f"training.max_steps={max_steps}", *extra]
        run(load_recipe(OFFLINE_TINY, [*overrides, f"training.save_every={steps}"]))

    train(tmp_path / "full", 2 * steps)
    train(tmp_path / "continued", steps)
    train(tmp_path / "continued", 2 * steps, "training.resume_from_checkpoint=latest")
    # metrics.jsonl: the first run's steps, then the continued run's
    assert [r["loss"] for r in logged(tmp_path / "continued")] == [r["loss"] for r in logged(tmp_path / "full")]
    want = load_file(tmp_path / "full" / "bundle" / "adapter_model.safetensors")
    got = load_file(tmp_path / "continued" / "bundle" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_logged_loss_is_the_mean_over_the_steps_micro_batches(tmp_path):
    """Batch 8 and batch 4 x accumulation 2 see the same 8 examples (equal lengths, no dropout): same step-1 loss.

    Without router losses: a batch's load-balancing loss is not the mean of its halves'.
    """
    common = ["training.max_steps=1", "training.log_every=1", "training.save_every=null", "training.eval_every=null"]
    common += ["adapter.config.aux_loss_coef=0", "adapter.config.z_loss_coef=0"]
    first = []
    for batch, accumulation in [(8, 1), (4, 2)]:
        out = tmp_path / f"{batch}x{accumulation}"
        shape = [f"training.batch_size={batch}", f"training.gradient_accumulation_steps={accumulation}"]
        run(load_recipe(OFFLINE_TINY, [*common, *shape, f"training.output_dir={out}"]))
        first.append(logged(out)[0])
    assert first[0]["step"] == first[1]["step"] == 1
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], abs=1e-5)
