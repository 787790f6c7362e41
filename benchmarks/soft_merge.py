"""Soft merging of expert parameters (router='soft_merge') against the dense mixture of outputs.

Run from the repository root (no network needed):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soft_merge.py            # full run, about a minute on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soft_merge.py --quick    # smoke run: small shapes, 3 repetitions
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soft_merge.py --out DIR  # default: benchmarks/results

It writes ``DIR/soft_merge_cpu.json`` and ``DIR/soft_merge_cpu.md`` and prints the markdown table.

What is measured: one ``MoPELayer`` around an ``nn.Linear(d, d)`` with N experts, the gate
deciding once per sequence (``routing_level='sequence'``) in every candidate, so all candidates
see the same kind of decision and differ only in how it is applied:

- ``dense_mixture``: router='dense': every expert runs on every token, outputs mixed by the gate
  (the masked two-GEMM dispatch over all N·r ranks; for adapters, the N bottlenecks).
- ``soft_merge_factors`` / ``soft_merge_delta`` (LoRA) and ``soft_merge`` (adapter): the gate's
  probabilities merge the parameters once per sequence, one expert runs per token.

A *step* is a forward pass and, in the "train" column, ``backward`` of the output's sum (the base
weight frozen, expert and router weights trained). After warm-up, each repetition runs every
candidate once in an order rotated per repetition; a ratio is the median over repetitions of
(candidate time / dense-mixture time in the same repetition), with its 25-75 % range.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import mope
from mope.layer import MoPELayer

RESULTS = Path(__file__).resolve().parent / "results"

# candidate -> config kwargs (all at routing_level='sequence')
LORA = {
    "dense_mixture": {"router": "dense"},
    "soft_merge_factors": {"router": "soft_merge", "soft_merge_lora": "factors"},
    "soft_merge_delta": {"router": "soft_merge", "soft_merge_lora": "delta"},
}
ADAPTER = {"dense_mixture": {"router": "dense"}, "soft_merge": {"router": "soft_merge"}}


def build_layer(d: int, num_experts: int, r: int, expert_type: str, kwargs: dict) -> MoPELayer:
    config = mope.MoPEConfig(
        num_experts=num_experts, r=r, expert_type=expert_type, routing_level="sequence", init_weights=False, **kwargs
    )
    torch.manual_seed(0)
    layer = MoPELayer(nn.Linear(d, d), "default", config)
    layer.base_layer.requires_grad_(False)
    return layer


def run_step(layer: MoPELayer, x: torch.Tensor, train: bool) -> None:
    if train:
        for p in layer.parameters():
            p.grad = None
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def interleaved(layers: dict[str, MoPELayer], x: torch.Tensor, train: bool, reps: int, warmup: int = 2):
    names = list(layers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            run_step(layers[name], x, train)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            run_step(layers[name], x, train)
            times[name].append(time.perf_counter() - start)
    return times


def ratio(candidate: list[float], reference: list[float]) -> dict[str, float]:
    ratios = sorted(c / r for c, r in zip(candidate, reference, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q25": q[0], "q75": q[2]}


def expert_flops_per_token(name: str, d: int, n: int, r: int, tokens_per_seq: int) -> float:
    """Multiply-adds per token of the expert part (merge cost spread over the sequence's tokens)."""
    if name == "dense_mixture":
        return 2 * n * r * d
    if name in ("soft_merge_factors", "soft_merge"):
        return 2 * r * d + 2 * n * r * d / tokens_per_seq
    return d * d + n * r * d * d / tokens_per_seq  # delta: apply dW, form dW once per sequence


def measure(args) -> list[dict]:
    rows = []
    x = torch.randn(args.batch, args.seq, args.d)
    for expert_type, candidates in (("lora", LORA), ("adapter", ADAPTER)):
        layers = {
            name: build_layer(args.d, args.num_experts, args.r, expert_type, kw) for name, kw in candidates.items()
        }
        for train in (False, True):
            times = interleaved(layers, x, train, args.reps)
            for name in candidates:
                rows.append(
                    {
                        "expert_type": expert_type,
                        "candidate": name,
                        "step": "train" if train else "forward",
                        "ms": 1000 * statistics.median(times[name]),
                        "ratio_to_dense_mixture": ratio(times[name], times["dense_mixture"]),
                        "expert_macs_per_token": expert_flops_per_token(
                            name, args.d, args.num_experts, args.r, args.seq
                        ),
                    }
                )
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# soft_merge vs dense mixture of outputs",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); load average at start "
        f"{meta['load']}. Layer `nn.Linear({meta['d']}, {meta['d']})`, N={meta['num_experts']} experts, r={meta['r']}, "
        f"batch {meta['batch']} x {meta['seq']} tokens, routing_level='sequence', {meta['reps']} interleaved "
        f"repetitions{' (--quick: a smoke run, not a measurement)' if meta['quick'] else ''}.",
        "",
        "| experts | candidate | step | ms (median) | vs dense mixture (median [25-75 %]) | expert MACs / token |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        q = row["ratio_to_dense_mixture"]
        lines.append(
            f"| {row['expert_type']} | {row['candidate']} | {row['step']} | {row['ms']:.2f} | "
            f"{q['median']:.2f}x [{q['q25']:.2f}-{q['q75']:.2f}] | {row['expert_macs_per_token']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repetitions: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.d, args.num_experts, args.r, args.batch, args.seq, args.reps = 128, 8, 8, 2, 32, 3
        torch.set_num_threads(1)
    else:
        args.d, args.num_experts, args.r, args.batch, args.seq, args.reps = 1024, 8, 8, 4, 256, 15
    meta = {
        "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load": f"{os.getloadavg()[0]:.2f}",
        **{k: getattr(args, k) for k in ("d", "num_experts", "r", "batch", "seq", "reps", "quick")},
    }
    rows = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(meta, rows)
    (args.out / "soft_merge_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "soft_merge_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
