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
def test_ddp_on_two_cpu_processes_ends_with_identical_weights_and_destroys_its_group(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(GROUP_AFTER_MAIN)
    command = [*LAUNCH, "--multi_gpu", "--num_processes", "2", str(script), str(tmp_path)]
    command += ["--recipe", str(OFFLINE_TINY)]
    command += [f"training.output_dir={tmp_path}", "training.max_steps=6", "training.save_every=null"]
    ran = subprocess.run(
        command, env=env(ACCELERATE_USE_CPU="1"), cwd=ROOT, timeout=600, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert [(tmp_path / f"alive{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rank_checksums"]) == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    assert summary["steps"] == 6


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
