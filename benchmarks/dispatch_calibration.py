"""Calibrate ``mope.dispatch.auto_dispatch``: masked vs sorted on one LoRA expert layer, fwd + bwd.

Run from the repository root (CPU, 1 thread, a minute or two):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dispatch_calibration.py [--quick] [--out DIR]

For each shape (tokens T, width d = d_in = d_out, N experts, top-k, r = 8) it times one step
(forward, then backward of the output's sum, grads w.r.t. x, A, B and the router logits) of each
strategy, interleaved, and reports the median of per-repetition ratios sorted / masked
(< 1: sorted is faster). Writes ``DIR/dispatch_calibration.json`` and ``.md``.
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

from mope.dispatch import LORA_DISPATCH, auto_dispatch

REPO_ROOT = Path(__file__).resolve().parent.parent
FULL_GRID = [
    (t, d, n, k) for t in (128, 1024) for d in (256, 1024) for n, k in ((8, 2), (16, 2), (64, 2), (8, 1), (4, 2))
]
QUICK_GRID = [(64, 64, 8, 2), (64, 64, 4, 2)]


def make_step(tokens: int, d: int, n: int, k: int, name: str, r: int = 8):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=generator, requires_grad=True)
    lora_a = torch.randn(n, r, d, generator=generator).div_(d**0.5).requires_grad_()
    lora_b = torch.randn(n, r, d, generator=generator).div_(r**0.5).requires_grad_()
    logits = torch.randn(tokens, n, generator=generator, requires_grad=True)
    apply = LORA_DISPATCH[name].apply

    def step() -> None:
        probs = logits.softmax(-1)
        values, index = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, index, values)
        apply(x, lora_a, lora_b, weights, 2.0).sum().backward()

    return step


def ratio(tokens: int, d: int, n: int, k: int, reps: int) -> float:
    steps = {name: make_step(tokens, d, n, k, name) for name in ("masked", "sorted")}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        for name in list(steps)[rep % 2 :] + list(steps)[: rep % 2]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return statistics.median(s / m for s, m in zip(times["sorted"], times["masked"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid, reps = (QUICK_GRID, 3) if args.quick else (FULL_GRID, 15)
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for tokens, d, n, k in grid:
        value = ratio(tokens, d, n, k, reps)
        rows.append({"tokens": tokens, "d": d, "N": n, "k": k, "sorted_over_masked": round(value, 3)})
        rows[-1]["auto"] = auto_dispatch(tokens, n, k)
        print(rows[-1], flush=True)
    info = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "reps": reps,
        "load before": load_before,
        "load after": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dispatch_calibration.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    lines = ["# sorted / masked, one LoRA layer fwd+bwd, r=8, fp32", "", *(f"- {k}: {v}" for k, v in info.items())]
    lines += ["", "| tokens | d | N | k | sorted / masked | auto picks |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['tokens']} | {r['d']} | {r['N']} | {r['k']} | {r['sorted_over_masked']:.2f} | {r['auto']} |"
        for r in rows
    ]
    (args.out / "dispatch_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
