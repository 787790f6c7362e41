"""Calibrate ``mope.dispatch.auto_dispatch``: masked vs sorted (and candidates) on one LoRA expert layer, fwd + bwd.

Run from the repository root (CPU, 1 thread, a minute or two; or on a CUDA machine, bf16):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dispatch_calibration.py [--quick] [--device cuda] [--out DIR]

For each shape (tokens T, width d = d_in = d_out, N experts, top-k, r = 8) it times one step
(forward, then backward of the output's sum, grads w.r.t. x, A, B and the router logits) of each
strategy (each adds its delta into a given base output), interleaved, and reports the median of
per-repetition ratios strategy / masked
(< 1: the strategy is faster). On CPU the strategies are masked, sorted and sparse (fp32); on CUDA masked,
sorted, grouped (bf16, where ``grouped`` can run) and triton (where Triton is installed). Writes ``DIR/dispatch_calibration_cpu.json``
and ``.md`` (``dispatch_calibration_cuda.*`` on CUDA; default DIR: benchmarks/results).
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

from mope.dispatch import ALL_DISPATCH, auto_dispatch

REPO_ROOT = Path(__file__).resolve().parent.parent
FULL_GRID = [
    (t, d, n, k) for t in (128, 1024) for d in (256, 1024) for n, k in ((8, 2), (16, 2), (64, 2), (8, 1), (4, 2))
]
CUDA_GRID = [
    (t, d, n, k) for t in (1024, 8192) for d in (1024, 4096) for n, k in ((8, 2), (16, 2), (64, 2), (8, 1), (4, 2))
]
QUICK_GRID = [(64, 64, 8, 2), (64, 64, 4, 2)]


def lora_padded(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
) -> torch.Tensor:
    """A candidate kept here, not in mope.dispatch: ``sorted`` with the loop over experts replaced by two
    ``bmm`` over expert-major rows padded to the busiest expert's count (padding rows: token 0, gate 0).

    Work tracks ``N * max_count`` rows (``k * T`` when balanced) with no Python loop. On CPU it lost to
    ``masked`` at every N/k <= 4 shape measured and was mixed at N/k = 8 (the table's ``padded`` column).
    """
    n, _, d_in = lora_A.shape
    w = weights.reshape(-1, n)
    used = w != 0
    position = used.cumsum(0) - 1  # a pair's place among its expert's tokens
    capacity = int(position[-1].max()) + 1  # the one host sync
    slot = (torch.arange(n, device=x.device) * capacity + position)[used]
    token = torch.arange(w.shape[0], device=x.device).unsqueeze(1).expand_as(w)[used]
    index = torch.zeros(n * capacity, dtype=torch.long, device=x.device).index_put_((slot,), token)
    gate = torch.zeros(n * capacity, dtype=x.dtype, device=x.device).index_put_(
        (slot,), (w[used] * scaling).to(x.dtype)
    )
    rows = x.reshape(-1, d_in).index_select(0, index).view(n, capacity, d_in)
    hidden = torch.bmm(rows, lora_A.transpose(1, 2)) * gate.view(n, capacity, 1)
    out = torch.bmm(hidden, lora_B).view(n * capacity, -1)
    return base_out.reshape(w.shape[0], -1).index_add(0, index, out).view(base_out.shape)


CANDIDATES = {"padded": lora_padded}  # timed next to mope's strategies, not offered by mope


def make_step(tokens: int, d: int, n: int, k: int, name: str, device: str, r: int = 8):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype).requires_grad_()

    x, lora_a, lora_b = leaf(tokens, d), leaf(n, r, d, scale=d**-0.5), leaf(n, r, d, scale=r**-0.5)
    logits = torch.randn(tokens, n, generator=generator).to(device).requires_grad_()
    base_out = torch.randn(tokens, d, generator=generator).to(device, dtype)  # what the frozen layer gave
    apply = CANDIDATES[name] if name in CANDIDATES else ALL_DISPATCH[name].apply

    def step() -> None:
        probs = logits.softmax(-1)
        values, index = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, index, values)
        apply(x, lora_a, lora_b, weights, 2.0, base_out).sum().backward()

    return step


def strategies(device: str, d: int) -> list[str]:
    """masked first (the reference), then what can run here at this width."""
    probe_x = torch.zeros(1, d, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    probe_a = torch.zeros(2, 8, d, device=device, dtype=probe_x.dtype)
    return [name for name, s in ALL_DISPATCH.items() if s.supported(probe_x, probe_a)] + list(CANDIDATES)


def ratios(tokens: int, d: int, n: int, k: int, reps: int, device: str) -> dict[str, float]:
    """Median over repetitions of each strategy's time / masked's time."""
    steps = {name: make_step(tokens, d, n, k, name, device) for name in strategies(device, d)}
    for step in steps.values():
        step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    result = {"masked_ms": round(1000 * statistics.median(times["masked"]), 4)}
    for name in names[1:]:
        result[name] = round(statistics.median(s / m for s, m in zip(times[name], times["masked"], strict=True)), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid, reps = (QUICK_GRID, 3) if args.quick else (CUDA_GRID if args.device == "cuda" else FULL_GRID, 15)
    if args.device == "cuda":
        reps *= 2
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for tokens, d, n, k in grid:
        rows.append({"tokens": tokens, "d": d, "N": n, "k": k, **ratios(tokens, d, n, k, reps, args.device)})
        rows[-1]["auto"] = auto_dispatch(tokens, n, k, args.device)
        print(rows[-1], flush=True)
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "threads": 1,
        "reps": reps,
        "load before": load_before,
        "load after": [round(v, 2) for v in os.getloadavg()],
    }
    others = [name for name in rows[0] if name not in ("tokens", "d", "N", "k", "masked_ms", "auto")]
    stem = f"dispatch_calibration_{args.device}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# strategy / masked, one LoRA layer fwd+bwd, r=8, {info['dtype']}",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "| tokens | d | N | k | masked ms | " + " | ".join(f"{name} / masked" for name in others) + " | auto picks |",
        "|---|---|---|---|---|" + "---|" * len(others) + "---|",
    ]
    lines += [
        f"| {r['tokens']} | {r['d']} | {r['N']} | {r['k']} | {r['masked_ms']:.3f} | "
        + " | ".join(f"{r.get(name, float('nan')):.2f}" for name in others)
        + f" | {r['auto']} |"
        for r in rows
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
