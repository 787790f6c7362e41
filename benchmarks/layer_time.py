"""One adapted linear layer, forward + backward: MoPE against one LoRA, a frozen layer and the naive loop.

Run from the repository root, alone on the machine (CPU, a minute or two):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/layer_time.py [--quick] [--threads N] [--out DIR]

The issue's reference shape: an ``nn.Linear(1024 -> 2048)`` (weight 2048 x 1024) on 2048 tokens,
fp32. Each candidate wraps the same frozen layer; a step is the forward pass and the backward of
the output's sum (gradients for the input and the adapter's parameters). Candidates: the frozen
layer (input gradient only), PEFT LoRA r=8 and r=16, MoPE top-2 of 8 with r=8 (the real
``MoPELayer`` with its router, computing both aux losses, whose backward the step leaves out: it
backpropagates the layer's output alone; dispatch ``auto`` and forced ``sorted``), and
three per-expert loops (top-2 of 8, r=8): step_time.py's naive loop (the frozen layer once, each
expert's LoRA on its tokens) and two where each expert is the frozen layer plus its LoRA, on its
tokens (MoE-PEFT's MixLoRA: the frozen weight runs k times per token) or on every token (N times).
Interleaved repetitions after warm-up;
ratios are medians of per-repetition ratios [25-75 %]. Writes ``DIR/layer_time_cpu.json`` and ``.md``
(default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from step_time import REPO_ROOT, NaiveLoopMoELoRA, Row, interleaved_times, load_average, machine, paired_ratio
from step_time import section_table as table
from torch import nn

import mope


class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(d_in, d_out)
        self.proj.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def frozen(layer: OneLayer) -> nn.Module:
    return layer


def peft_lora(r: int) -> Callable[[OneLayer], nn.Module]:
    return lambda layer: get_peft_model(layer, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))


def mope_top2(dispatch: str) -> Callable[[OneLayer], nn.Module]:
    config = dict(num_experts=8, top_k=2, r=8, lora_alpha=16, target_modules=["proj"], dispatch=dispatch)
    return lambda layer: get_peft_model(layer, mope.MoPEConfig(**config))


def naive(layer: OneLayer) -> nn.Module:
    layer.proj = NaiveLoopMoELoRA(layer.proj)
    return layer


class ExpertsWithFrozenWeight(NaiveLoopMoELoRA):
    """The loop where each expert is the frozen layer plus its own LoRA, as in MoE-PEFT's MixLoRA.

    Per expert, its tokens (``torch.where``) go through ``W x + s B_e A_e x`` and ``index_add_``
    puts the weighted result back, so the frozen weight runs once per (token, expert) pair: k times
    per token. ``every_token=True``: each expert runs on all tokens and the top-k weights (zero for
    the others) mix the N outputs: the frozen weight runs N times per token.
    """

    def __init__(self, base: nn.Linear, every_token: bool = False) -> None:
        super().__init__(base)
        self.every_token = every_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.router(flat.float()), dim=-1)
        values, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, experts, values / values.sum(dim=-1, keepdim=True))
        out = flat.new_zeros(flat.shape[0], self.base.out_features)
        for e, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            token = torch.arange(flat.shape[0]) if self.every_token else torch.where(experts == e)[0]
            rows = flat[token]
            expert_out = self.base(rows) + lora_b(lora_a(rows)) * self.scaling
            out = out.index_add(0, token, expert_out * weights[token, e, None])
        return out.view(*x.shape[:-1], -1)


def experts_with_frozen_weight(every_token: bool) -> Callable[[OneLayer], nn.Module]:
    def attach(layer: OneLayer) -> nn.Module:
        layer.proj = ExpertsWithFrozenWeight(layer.proj, every_token)
        return layer

    return attach


CANDIDATES = {
    "frozen_layer": ("frozen layer (input grad only)", frozen),
    "peft_lora_r8": ("PEFT LoRA r=8", peft_lora(8)),
    "peft_lora_r16": ("PEFT LoRA r=16", peft_lora(16)),
    "mope_top2_of_8": ("MoPE top-2 of 8, r=8 (dispatch auto)", mope_top2("auto")),
    "mope_top2_of_8_sorted": ("MoPE top-2 of 8, r=8 [dispatch=sorted]", mope_top2("sorted")),
    "naive_loop_top2_of_8": ("naive per-expert loop, top-2 of 8, r=8", naive),
    "loop_frozen_in_experts": (
        "per-expert loop, each expert = frozen layer + its LoRA on its tokens (MoE-PEFT's MixLoRA)",
        experts_with_frozen_weight(every_token=False),
    ),
    "loop_frozen_in_experts_all_tokens": (
        "per-expert loop, each expert = frozen layer + its LoRA on every token, top-2 weights mix",
        experts_with_frozen_weight(every_token=True),
    ),
}


def run(tokens: int, d_in: int, d_out: int, warmup: int, reps: int) -> list[Row]:
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)
    steps = {}
    for name, (_, attach) in CANDIDATES.items():
        model = attach(OneLayer(d_in, d_out)).train()

        def step(model: nn.Module = model) -> None:
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x).sum().backward()

        step()
        steps[name] = step
    times = interleaved_times(steps, warmup, reps, "cpu")
    shape = f"nn.Linear({d_in} -> {d_out}), {tokens} tokens, fp32, forward + backward"
    refs = ("peft_lora_r16", "frozen_layer", *(name for name in CANDIDATES if "loop" in name))
    return [
        Row(
            "one layer",
            name,
            label,
            shape,
            "ms",
            value=1000 * statistics.median(times[name]),
            ratios={ref: paired_ratio(times[name], times[ref]) for ref in refs},
        )
        for name, (label, _) in CANDIDATES.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny layer, 3 repetitions (smoke test)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; --quick: 1)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    started, info = time.perf_counter(), machine()
    info["load average (1, 5, 15 min) before"] = str(load_average())
    shape, warmup, reps = ((64, 32, 64), 1, 3) if args.quick else ((2048, 1024, 2048), 2, 15)
    rows = run(*shape, warmup=warmup, reps=reps)
    info["load average (1, 5, 15 min) after"] = str(load_average())
    info["wall time s"] = round(time.perf_counter() - started, 1)
    text = "\n".join(
        [
            f"# One adapted layer ({'quick' if args.quick else 'full'})",
            "",
            *(f"- {key}: {value}" for key, value in info.items()),
            "",
            f"Shape: {rows[0].shape}. Ratios: candidate time / reference time, median [25-75 %].",
            "",
            table(rows),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_time_cpu.md").write_text(text + "\n")
    payload = {"machine": info, "rows": [asdict(row) for row in rows]}
    (args.out / "layer_time_cpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
