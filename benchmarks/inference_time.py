"""Inference cost of MoPE: forward latency (merged and unmerged) and KV-cached generation speed.

Run from the repository root, alone on the machine (no network; tiny random Llamas from configs):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference_time.py            # full run, a few minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference_time.py --quick    # smoke run, seconds
    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference_time.py --host --dispatch masked,triton
                                                                  # host time per new token, tiny widths

Writes ``DIR/inference_time_cpu.json`` and ``.md`` (default DIR: benchmarks/results); with ``--device cuda``,
``inference_time_h100.*`` (the GPU's model, see step_time.machine_tag).
Same method as step_time.py (its helpers are reused): all candidates of a table in one process,
interleaved repetitions after warm-up, ratios as the median of per-repetition ratios [25-75 %].

- *forward*: ``model.eval()``, ``torch.no_grad()``, one forward of a batch (all-ones mask). The merged
  rows are what a deployment runs: a MoPE adapter with task-level routing pinned to one task
  (``mope.fix_task``) and folded into the base weights by ``merge_and_unload()``, and PEFT's merged
  LoRA; both are plain Llamas again, so they should cost what the base costs.
- *generate*: greedy ``generate`` with the KV cache, a batch of prompts, a fixed number of new tokens
  (``min_new_tokens`` = ``max_new_tokens``, so every candidate decodes the same count); the value is
  new tokens per second over the batch. Token-level gates route each new token once; sequence-level
  routing reuses the prompt's decision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from step_time import (
    REPO_ROOT,
    Row,
    Shape,
    build_base,
    interleaved_times,
    load_average,
    machine,
    machine_tag,
    paired_ratio,
    replaced_triton_launches,
    section_table,
    skipped_launch,
)
from torch import nn

import mope
from mope.dispatch import DISPATCH_CHOICES

Attach = Callable[[nn.Module], nn.Module]


def peft_lora(r: int, merged: bool = False) -> Attach:
    def attach(model: nn.Module) -> nn.Module:
        lora = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        return lora.merge_and_unload() if merged else lora

    return attach


def top2_of_8(**settings) -> mope.MoPEConfig:
    """The MoPE candidate of every table: top-2 of 8 LoRA experts, r=8, on all linear layers."""
    common = {"task_type": "CAUSAL_LM", "num_experts": 8, "top_k": 2, "r": 8, "lora_alpha": 16}
    return mope.MoPEConfig(target_modules="all-linear", **common, **settings)


def mope_mixture(routing_level: str = "token", dispatch: str = "auto") -> Attach:
    return lambda model: get_peft_model(model, top2_of_8(routing_level=routing_level, dispatch=dispatch))


def mope_task_merged(model: nn.Module) -> nn.Module:
    """Task-level top-2 of 8 (random, non-identity experts), pinned to task 1 and merged into the base."""
    wrapped = get_peft_model(model, top2_of_8(routing_level="task", num_tasks=4, init_weights=False))
    mope.fix_task(wrapped, 1)
    return wrapped.merge_and_unload()


@dataclass(frozen=True)
class Candidate:
    name: str
    label: str
    attach: Attach


def base(model: nn.Module) -> nn.Module:
    return model


FORWARD = (
    Candidate("frozen_base", "base model", base),
    Candidate("peft_lora_r16", "PEFT LoRA r=16, unmerged", peft_lora(16)),
    Candidate("mope_top2_of_8", "MoPE top-2 of 8, r=8, unmerged", mope_mixture()),
    Candidate("peft_lora_r16_merged", "PEFT LoRA r=16, merge_and_unload", peft_lora(16, merged=True)),
    Candidate("mope_task_merged", "MoPE task-level top-2 of 8, fix_task + merge_and_unload", mope_task_merged),
)
GENERATE = (
    Candidate("frozen_base", "base model", base),
    Candidate("peft_lora_r16", "PEFT LoRA r=16", peft_lora(16)),
    Candidate("mope_top2_of_8", "MoPE top-2 of 8, r=8, token-level", mope_mixture()),
    Candidate("mope_top2_of_8_seq", "MoPE top-2 of 8, r=8, sequence-level", mope_mixture("sequence")),
)


@dataclass(frozen=True)
class Settings:
    forward_shape: Shape
    generate_shape: Shape  # batch x seq = prompts x prompt length
    new_tokens: int
    warmup: int
    reps: int
    device: str = "cpu"  # "cuda": bf16 base models on the GPU
    dispatches: tuple[str, ...] = ()  # --dispatch: extra token-level MoPE rows with MoPEConfig.dispatch forced

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def where(self) -> str:
        return "CUDA bf16" if self.device == "cuda" else "CPU fp32"


FULL = Settings(Shape(256, 4, 8, 128), Shape(256, 4, 4, 32), new_tokens=32, warmup=2, reps=15)
QUICK = Settings(Shape(64, 2, 2, 16), Shape(64, 2, 2, 8), new_tokens=4, warmup=1, reps=3)
# --host: one prompt of 4 tokens at hidden 32 on 1 thread (forward_shape unused)
HOST = Settings(Shape(32, 4, 1, 4), Shape(32, 4, 1, 4), new_tokens=16, warmup=2, reps=21)


def with_dispatch(candidates: tuple[Candidate, ...], dispatches: tuple[str, ...]) -> tuple[Candidate, ...]:
    """``candidates`` plus a token-level MoPE top-2 of 8 row per forced dispatch strategy (e.g. ``triton``)."""
    forced = (
        Candidate(
            f"mope_top2_of_8_{name}", f"MoPE top-2 of 8, r=8, token-level, dispatch={name}", mope_mixture(dispatch=name)
        )
        for name in dispatches
    )
    return (*candidates, *forced)


def build(candidate: Candidate, shape: Shape, settings: Settings) -> nn.Module:
    model = candidate.attach(build_base(shape, settings.device, settings.dtype)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def prompts(shape: Shape, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def forward_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(**batch)

    return step


def generate_step(model: nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> Callable[[], None]:
    def step() -> None:
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens

    return step


def table_rows(
    section: str,
    candidates: tuple[Candidate, ...],
    shape: Shape,
    make_step: Callable[[nn.Module], Callable[[], None]],
    settings: Settings,
    to_value: Callable[[float], float],
    metric: str,
) -> list[Row]:
    steps = {}
    for candidate in candidates:
        steps[candidate.name] = make_step(build(candidate, shape, settings))
        steps[candidate.name]()  # built and run once before timing
    times = interleaved_times(steps, settings.warmup, settings.reps, settings.device)
    references = [name for name in ("frozen_base", "peft_lora_r16") if name in times]
    return [
        Row(
            section,
            c.name,
            c.label,
            shape.describe(),
            metric,
            value=to_value(statistics.median(times[c.name])),
            ratios={ref: paired_ratio(times[c.name], times[ref]) for ref in references},
        )
        for c in candidates
    ]


def host_rows(settings: Settings) -> list[Row]:
    """Host time of KV-cached greedy generation at tiny widths on 1 thread: the CPU's side of GPU decoding.

    As step_time.py's host table: at hidden 32 the arithmetic is negligible, and every Triton launch runs
    nothing (step_time.skipped_launch), so the ``dispatch=triton`` row (under ``TRITON_INTERPRET=1``) times
    the host work around the kernels; a GPU adds Triton's per-launch cost. Value: ms per new token, the
    prompt's forward included.
    """
    batch = prompts(settings.generate_shape, settings.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with replaced_triton_launches(skipped_launch):
            return table_rows(
                f"host time of greedy generation with KV cache, {settings.new_tokens} new tokens "
                "(tiny widths, 1 CPU thread; Triton launches run nothing)",
                with_dispatch(GENERATE, settings.dispatches),
                settings.generate_shape,
                lambda model: generate_step(model, batch, settings.new_tokens),
                settings,
                lambda seconds: 1000 * seconds / settings.new_tokens,
                "ms per new token",
            )
    finally:
        torch.set_num_threads(threads)


def timed_rows(settings: Settings) -> list[Row]:
    """The forward-latency and generation tables."""
    forward_batch = prompts(settings.forward_shape, settings.device)
    generate_batch = prompts(settings.generate_shape, settings.device)
    new_tokens = settings.generate_shape.batch * settings.new_tokens
    rows = table_rows(
        f"forward latency, {settings.where}, eval, no_grad",
        with_dispatch(FORWARD, settings.dispatches),
        settings.forward_shape,
        lambda model: forward_step(model, forward_batch),
        settings,
        lambda seconds: 1000 * seconds,
        "ms",
    )
    return rows + table_rows(
        f"greedy generation with KV cache, {settings.new_tokens} new tokens per prompt, {settings.where}",
        with_dispatch(GENERATE, settings.dispatches),
        settings.generate_shape,
        lambda model: generate_step(model, generate_batch, settings.new_tokens),
        settings,
        lambda seconds: new_tokens / seconds,
        "new tokens/s",
    )


def run(settings: Settings, mode: str, out: Path) -> str:
    """The tables of ``mode`` (full, quick: timed; host: host time), written to ``out`` as .md and .json."""
    started, info = time.perf_counter(), machine()
    info["load average (1, 5, 15 min) before"] = str(load_average())
    info["repetitions"] = f"{settings.warmup} warm-up + {settings.reps} timed per candidate"
    rows = host_rows(settings) if mode == "host" else timed_rows(settings)
    info["load average (1, 5, 15 min) after"] = str(load_average())
    info["wall time s"] = round(time.perf_counter() - started, 1)
    parts = [f"# Inference benchmark ({mode})", "", *(f"- {key}: {value}" for key, value in info.items())]
    parts += [
        "",
        "Ratios are time ratios (candidate / reference, median of interleaved repetitions [25-75 %]): "
        "below 1 is faster. For generation the value column is throughput (higher is faster), except in the "
        "host table (ms per new token).",
    ]
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    for section, members in sections.items():
        parts += ["", f"## {section}", "", f"Shape: {members[0].shape}", "", section_table(members)]
    text = "\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"inference_time_{'host_' if mode == 'host' else ''}{machine_tag(settings.device)}"
    (out / f"{stem}.md").write_text(text)
    payload = {"mode": mode, "machine": info, "rows": [asdict(row) for row in rows]}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke test)")
    parser.add_argument(
        "--host",
        action="store_true",
        help="only the host time of generation at hidden 32 on 1 thread, Triton launches running nothing (with "
        "--dispatch triton, run under TRITON_INTERPRET=1) -> inference_time_host_cpu.md/.json",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; --quick: 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 models on the GPU")
    parser.add_argument(
        "--dispatch",
        default="",
        help=f"comma-separated MoPEConfig.dispatch values ({','.join(DISPATCH_CHOICES)}): an extra token-level MoPE "
        "row per value in both tables, beside the default rows (which use 'auto')",
    )
    args = parser.parse_args()
    dispatches = tuple(name for name in args.dispatch.split(",") if name)
    unknown = set(dispatches) - set(DISPATCH_CHOICES)
    if unknown:
        parser.error(f"unknown --dispatch {sorted(unknown)}; choose from {list(DISPATCH_CHOICES)}")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    settings, mode = (HOST, "host") if args.host else (QUICK, "quick") if args.quick else (FULL, "full")
    print(run(replace(settings, device=args.device, dispatches=dispatches), mode, args.out))


if __name__ == "__main__":
    main()
