"""training.compile: the loop compiles the model through accelerate's dynamo plugin (inductor, on CPU here),
and compiled training follows eager training step for step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from mope.training.loop import Run, run
from mope.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"
# Fixed-length batches (max_length 8, every text longer) so inductor compiles one shape, once.
QUICK = ["training.max_steps=4", "training.save_every=null", "data.max_examples=20", "training.log_every=1"]
QUICK += ["data.max_length=8", "training.batch_size=4", "training.eval_batch_size=4", "training.epochs=null"]
# inductor fuses and reorders float ops: the same losses up to float32 rounding, compounded over 4 steps.
TOLERANCE = 1e-4


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def fresh_run(out: Path, *overrides: str) -> dict:
    """A run with its own accelerate state (accelerate keeps the first Accelerator's plugins for the process)."""
    AcceleratorState._reset_state()
    return run(load_recipe(TINY, [*QUICK, f"training.output_dir={out}", *overrides]))


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(tmp_path):
    fresh_run(tmp_path / "eager")
    summary = fresh_run(tmp_path / "compiled", "training.compile=true")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, abs=TOLERANCE, rel=0)
    assert eager[0] != eager[-1]  # the steps trained something
    assert summary["steps"] == 4
    # the compiled model's state dict keys start with _orig_mod.: its bundle was written with no tensors
    from safetensors.torch import load_file

    saved = [load_file(tmp_path / run / "bundle" / "adapter_model.safetensors") for run in ("eager", "compiled")]
    assert saved[0] and saved[0].keys() == saved[1].keys()
    for key, value in saved[0].items():
        torch.testing.assert_close(saved[1][key], value, rtol=0, atol=1e-4)
    AcceleratorState._reset_state()


def test_the_model_is_compiled_through_accelerate(tmp_path):
    AcceleratorState._reset_state()
    job = Run(load_recipe(TINY, [*QUICK, f"training.output_dir={tmp_path}", "training.compile=true"]))
    plugin = job.accelerator.state.dynamo_plugin
    assert (plugin.backend.value, plugin.mode) == ("INDUCTOR", "default")
    job.setup()
    assert type(job.model).__name__ == "OptimizedModule"  # torch.compile's wrapper, made by accelerate's prepare
    AcceleratorState._reset_state()


def test_compile_mode_is_checked(tmp_path):
    base = [f"training.output_dir={tmp_path}"]
    recipe = load_recipe(TINY, [*base, "training.compile=true", "training.compile_mode=max-autotune"])
    assert recipe.training.compile_mode == "max-autotune"
    assert load_recipe(TINY, base).training.compile is False
    with pytest.raises(RecipeError, match=r"training\.compile_mode: Input should be 'default', 'reduce-overhead'"):
        load_recipe(TINY, [*base, "training.compile=true", "training.compile_mode=fast"])
    with pytest.raises(RecipeError, match=r"'compile_mode' needs 'compile: true'"):
        load_recipe(TINY, [*base, "training.compile_mode=reduce-overhead"])


def test_a_run_accelerate_would_not_compile_is_refused(tmp_path):
    AcceleratorState._reset_state()
    Run(load_recipe(TINY, [*QUICK, f"training.output_dir={tmp_path}"]))  # accelerate set up eager for the process
    with pytest.raises(RecipeError, match=r"training\.compile=true: an earlier Accelerator in this process"):
        Run(load_recipe(TINY, [*QUICK, f"training.output_dir={tmp_path}", "training.compile=true"]))
    AcceleratorState._reset_state()
