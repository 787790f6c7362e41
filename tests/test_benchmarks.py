"""Smoke tests of ``benchmarks/step_time.py`` and ``inference_time.py --quick``: they run and write well-formed results.

Not a timed test: nothing here asserts anything about speed or memory, only that every
expected row is there with positive numbers (or, for third-party X-LoRA, a recorded error).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "step_time.py"

STEP_ROWS = {
    "frozen_base",
    "peft_lora_r8",
    "peft_lora_r16",
    "mope_top2_of_8",
    "mope_top2_of_8_no_aux",
    "mope_top2_of_4",
    "peft_xlora_4x_r8",
    "naive_loop_top2_of_8",
}
SCALING_ROWS = {"mope_top2_of_4", "mope_top2_of_8", "mope_top2_of_16", "mope_top2_of_64"}
MEMORY_ROWS = {"peft_lora_r16", "mope_top2_of_8"}
MAY_FAIL = {"peft_xlora_4x_r8"}  # PEFT's X-LoRA may not construct with every peft/transformers version


def run_quick_benchmark(out: Path, script: Path = SCRIPT) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (table,) = out.glob(f"{script.stem}_*.md")  # named by what and where: step_time_cpu.md, inference_time_h100.md
    text = table.read_text()
    assert text.strip() in done.stdout  # the script prints the tables it writes
    results = json.loads(table.with_suffix(".json").read_text())
    shown = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}  # first cells
    assert not [row["label"] for row in results["rows"] if row["label"] not in shown]  # every row is in a table
    return results


def rows_of(results: dict, section_start: str) -> dict[str, dict]:
    return {row["name"]: row for row in results["rows"] if row["section"].startswith(section_start)}


def assert_positive(row: dict) -> None:
    if row["name"] in MAY_FAIL and row["note"].startswith("error:"):
        return
    assert not row["note"].startswith("error:"), row
    assert row["value"] is not None and row["value"] > 0, row
    assert row["ratios"], row
    for ratio in row["ratios"].values():
        assert 0 < ratio["q25"] <= ratio["median"] <= ratio["q75"], row


def check_machine(results: dict) -> None:
    machine = results["machine"]
    assert results["mode"] == "quick"
    for key in ("cpu", "torch_threads", "torch", "peft", "transformers"):
        assert machine[key], key


def check_step_rows(results: dict) -> None:
    rows = rows_of(results, "step time, CPU")
    assert set(rows) == STEP_ROWS
    for row in rows.values():
        assert_positive(row)
        xlora = {"peft_xlora_4x_r8"} if rows["peft_xlora_4x_r8"]["value"] is not None else set()
        if row["value"] is not None:
            assert set(row["ratios"]) == {"peft_lora_r16", "frozen_base", "mope_top2_of_8", *xlora}
    assert rows["peft_lora_r16"]["ratios"]["peft_lora_r16"]["median"] == 1.0


def check_minilm_rows(results: dict) -> None:
    rows = rows_of(results, "real MiniLM training step")
    assert set(rows) == {"frozen_base", "peft_lora_r16", "mope_top2_of_8"}
    for row in rows.values():
        assert_positive(row)
        assert set(row["ratios"]) == {"peft_lora_r16", "frozen_base"}


def check_scaling_rows(results: dict) -> None:
    rows = rows_of(results, "scaling with N")
    assert set(rows) == SCALING_ROWS
    for row in rows.values():
        assert_positive(row)
        assert set(row["ratios"]) == {"mope_top2_of_8"}


def check_memory_rows(results: dict) -> None:
    rows = rows_of(results, "peak memory of a training step, CPU")
    assert set(rows) == MEMORY_ROWS
    for row in rows.values():
        assert_positive(row)
        assert set(row["ratios"]) == {"peft_lora_r16", "peft_lora_r16 (step rise)"}


def check_ops_rows(results: dict) -> None:
    rows = rows_of(results, "aten compute ops and Triton launches per training step")
    assert set(rows) == {"frozen_base", "peft_lora_r16", "mope_top2_of_8", "mope_top2_of_8_no_aux"}
    for row in rows.values():
        assert_positive(row)
    counts = {name: row["value"] for name, row in rows.items()}
    assert counts["frozen_base"] < counts["peft_lora_r16"] < counts["mope_top2_of_8_no_aux"] < counts["mope_top2_of_8"]
    decode = rows_of(results, "aten compute ops and Triton launches per decode forward")
    assert set(decode) == set(rows)
    counts = {name: row["value"] for name, row in decode.items()}
    assert counts["frozen_base"] < counts["peft_lora_r16"] < counts["mope_top2_of_8"]


def check_host_rows(results: dict) -> None:
    rows = rows_of(results, "host time per training step")
    assert set(rows) == {"frozen_base", "peft_lora_r16", "mope_top2_of_8", "mope_top2_of_8_no_aux", "mope_top2_of_64"}
    for row in rows.values():
        assert_positive(row)
        assert set(row["ratios"]) == {"peft_lora_r16", "frozen_base"}


def check_gpu_rows(results: dict) -> None:
    gpu = [row for row in results["rows"] if "CUDA" in row["section"]]
    assert gpu
    if gpu[0]["note"] == "skipped: no CUDA":
        assert len(gpu) == 1
        return
    for row in gpu:
        assert_positive(row)


@pytest.mark.slow
def test_quick_benchmark_writes_every_row(tmp_path):
    """One test, so that the benchmark runs once even when pytest-xdist spreads tests over workers."""
    results = run_quick_benchmark(tmp_path)
    check_machine(results)
    check_step_rows(results)
    check_minilm_rows(results)
    check_scaling_rows(results)
    check_memory_rows(results)
    check_ops_rows(results)
    check_host_rows(results)
    check_gpu_rows(results)


@pytest.mark.slow
def test_quick_inference_benchmark_writes_every_row(tmp_path):
    results = run_quick_benchmark(tmp_path, REPO_ROOT / "benchmarks" / "inference_time.py")
    check_machine(results)
    forward = rows_of(results, "forward latency")
    assert set(forward) == {
        "frozen_base",
        "peft_lora_r16",
        "mope_top2_of_8",
        "peft_lora_r16_merged",
        "mope_task_merged",
    }
    generate = rows_of(results, "greedy generation")
    assert set(generate) == {"frozen_base", "peft_lora_r16", "mope_top2_of_8", "mope_top2_of_8_seq"}
    for row in [*forward.values(), *generate.values()]:
        assert_positive(row)
        assert set(row["ratios"]) == {"frozen_base", "peft_lora_r16"}


def test_the_inference_host_table_times_generation_per_new_token_on_one_thread(tmp_path):
    """``inference_time.py --host`` at one repetition: every generation row, per new token, thread count restored."""
    inference_time = benchmark_module("inference_time")
    threads = torch.get_num_threads()
    settings = replace(inference_time.HOST, new_tokens=2, warmup=0, reps=1)
    inference_time.run(settings, "host", tmp_path)
    assert torch.get_num_threads() == threads
    results = json.loads((tmp_path / "inference_time_host_cpu.json").read_text())
    rows = rows_of(results, "host time of greedy generation")
    assert set(rows) == {"frozen_base", "peft_lora_r16", "mope_top2_of_8", "mope_top2_of_8_seq"}
    for row in rows.values():
        assert_positive(row)
        assert row["metric"] == "ms per new token"


LOOPS = {"naive_loop_top2_of_8", "loop_frozen_in_experts", "loop_frozen_in_experts_all_tokens"}


@pytest.mark.slow
def test_quick_layer_benchmark_writes_every_row(tmp_path):
    results = run_quick_benchmark(tmp_path, REPO_ROOT / "benchmarks" / "layer_time.py")
    rows = rows_of(results, "one layer")
    assert set(rows) == {
        "frozen_layer",
        "peft_lora_r8",
        "peft_lora_r16",
        "mope_top2_of_8",
        "mope_top2_of_8_sorted",
        *LOOPS,
    }
    for row in rows.values():
        assert_positive(row)
        assert set(row["ratios"]) == {"peft_lora_r16", "frozen_layer", *LOOPS}


def test_padded_candidate_matches_masked_dispatch():
    """dispatch_calibration.py's padded-bmm candidate computes the masked form's values and gradients."""
    import torch

    from mope.dispatch import lora_masked

    lora_padded = benchmark_module("dispatch_calibration").lora_padded
    torch.manual_seed(0)
    for tokens, n, k, collapsed in ((37, 8, 2, False), (64, 8, 1, True), (20, 4, 4, False)):
        x = torch.randn(tokens, 16, requires_grad=True)
        lora_a, lora_b = torch.randn(n, 3, 16, requires_grad=True), torch.randn(n, 3, 24, requires_grad=True)
        logits = torch.randn(tokens, n) + (100 * torch.eye(n)[0] if collapsed else 0)  # collapsed: experts idle
        top = logits.topk(k, -1)
        weights = torch.zeros(tokens, n).scatter(1, top.indices, top.values.softmax(-1))
        upstream = torch.randn(tokens, 24)
        base_out = torch.randn(tokens, 24)
        results = []
        for fn in (lora_masked, lora_padded):
            out = fn(x, lora_a, lora_b, weights, 2.0, base_out)
            results.append((out, *torch.autograd.grad(out, (x, lora_a, lora_b), upstream)))
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_defaults_study_variants_are_valid_recipes(tmp_path):
    """Every study variant's overrides load as a recipe and build their adapter config; runs group by settings."""
    from mope.training.models import ADAPTER_CONFIGS, TASK_TYPES
    from mope.training.recipe import load_recipe

    study = benchmark_module("defaults_study")
    for method, overrides in study.VARIANTS.values():
        base = study.STUDY_BASE if method == "mope" else []
        recipe = load_recipe(study.RECIPES[method], [*base, *overrides])
        ADAPTER_CONFIGS[method](task_type=TASK_TYPES[recipe.model.task], **recipe.adapter.config)  # raises if bad
    row = {"task": "modules", "variant": study.LORA, "learning_rate": 0.002, "seed": 0, "eval_accuracy": 0.5}
    row |= {"train_seconds": 1.0, "trainable_parameters": 10}
    longer = {**row, "settings": ["training.epochs=8"], "eval_accuracy": 0.7}
    assert study.key(row) != study.key(longer)
    table = study.write_table([row, longer], str(tmp_path / "t.md"))
    header, *cells = (
        [cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line[:2] == "| "
    )
    # one table row per (task and settings, variant, lr): the two runs are not pooled
    by_task = {row["task"]: row for row in (dict(zip(header, line, strict=True)) for line in cells)}
    assert set(by_task) == {"modules", "modules training.epochs=8"}
    assert [by_task[t]["seeds"] for t in sorted(by_task)] == ["1", "1"]
    assert [by_task[t]["accuracy (mean)"] for t in sorted(by_task)] == ["0.5000", "0.7000"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_skipped_triton_launches_run_nothing_but_zero_integer_arguments_and_are_counted_then_restored():
    """The host section's launches run no kernel (none could run here: no CUDA, no interpreter) and leave valid
    indices; launches are counted through it; the real launcher is back afterwards."""
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    step_time = benchmark_module("step_time")
    original = JITFunction.run

    @triton.jit
    def fill(out_ptr, index_ptr):
        pass

    values, indices = torch.ones(3), torch.full((3,), 7)
    counter = type("Counter", (), {"count": 0})()
    with step_time.replaced_triton_launches(step_time.skipped_launch), step_time.counted_triton_launches(counter):
        fill[(1,)](values, indices)
        fill[(2,)](values, indices)
    assert counter.count == 2
    assert indices.tolist() == [0, 0, 0] and values.tolist() == [1.0, 1.0, 1.0]
    assert JITFunction.run is original


def test_the_cuda_profile_lists_each_compiled_kernel_variant_with_its_stages_shared_memory_and_registers(monkeypatch):
    """The table rows come from the mope kernels' own compile caches (a stand-in compiled kernel here: none can
    compile for a GPU on this machine); without any, no table."""
    from types import SimpleNamespace

    import triton

    from mope.kernels import lora

    step_time = benchmark_module("step_time")
    assert step_time.compiled_kernels_table() == ""

    @triton.jit
    def stand_in(out_ptr):
        pass

    compiled = SimpleNamespace(metadata=SimpleNamespace(num_warps=4, num_stages=2, shared=65536), n_regs=96, n_spills=8)
    stand_in.device_caches = {0: ({"key": compiled}, None)}
    monkeypatch.setattr(lora, "stand_in", stand_in, raising=False)
    table = step_time.compiled_kernels_table()
    assert "| stand_in | 4 | 2 | 65536 | 96 | 8 |" in table.splitlines()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_resources_reads_a_compiled_variants_registers_spills_and_shared_memory_and_tabulates_them():
    """One small kernel compiled for an H100 (no GPU needed): ptxas reports registers (at most 255 a thread) and no
    spill; a table row per kernel and ``tl.dot`` type, with one cell per warp count."""
    from kernel_specs import SMALL_SPEC as spec

    resources = benchmark_module("kernel_resources")
    registers, spilled, shared = resources.compile_usage(spec, 90, {"num_warps": 4})
    assert 0 < registers <= 255 and spilled == 0 and shared >= 0
    text = resources.table([spec, spec], 90, [4, 8])
    row = next(line for line in text.splitlines() if line.startswith("| count_pairs |"))
    assert row.startswith(f"| count_pairs | - | 2 | {registers} / 0 / 0 / ") and row.count("|") == 6
    assert "4 warps: 0 of 2 spill, 8 warps: 0 of 2 spill." in text


@pytest.mark.slow
def test_gpu_checks_skips_the_steps_its_budget_cannot_fit_and_logs_the_versions(tmp_path):
    # one device call is all a session gets: a step that would start with under 20 s of BUDGET left is skipped
    out = tmp_path / "out"
    env = {**os.environ, "BUDGET": "15", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", str(out), "step", "compiled"],
        capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    log = (out / "gpu_checks.log").read_text()
    assert done.returncode == 0, done.stderr
    assert f"torch {torch.__version__}" in log and "transformers" in log, log
    assert "step skipped: under 20 s of BUDGET=15 left" in log and "compiled skipped" in log, log
    assert "step exit" not in log and not list(out.glob("step_time_*")), log


HOST_INSTRUCTIONS = REPO_ROOT / "benchmarks" / "host_instructions.py"


def test_host_instructions_refuses_clearly_without_valgrind(tmp_path):
    """Without valgrind on the PATH the benchmark stops at once, naming what to install, and writes nothing."""
    env = {**os.environ, "PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(HOST_INSTRUCTIONS), "--only", "peft_lora_r16", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "valgrind" in done.stderr and "apt-get install valgrind" in done.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("valgrind") and shutil.which("callgrind_control")), reason="needs valgrind (Debian: valgrind)"
)
def test_host_instructions_counts_the_steps_of_a_candidate(tmp_path):
    """One candidate under callgrind: a positive count per step, the reference's ratio 1, written as JSON and a table."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(HOST_INSTRUCTIONS), "--only", "peft_lora_r16", "--steps", "1", "--jobs", "1"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path), "--name", "counted"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "counted.json").read_text())["rows"]
    assert row["name"] == "peft_lora_r16" and row["instructions"] > 1e6 and row["ratio"] == 1.0
    assert "| PEFT LoRA r=16 |" in (tmp_path / "counted.md").read_text()
