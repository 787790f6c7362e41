"""What makes a mixture pay on the demo task: a small study of MoPE defaults against an equal-size LoRA.

Run from the repository root, alone on the machine (offline, CPU; ~2.5 minutes per run on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/defaults_study.py --variants lora top2 --lrs 0.002 0.005 --seeds 0
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/defaults_study.py --list          # the variants and their overrides
    ... defaults_study.py --task modules ...   # the second task (finer labels), same variants

Every variant is a set of recipe overrides on the demo's MoPE recipe as it was when the study began
(``STUDY_BASE``: top-2 of 8, r=2, alpha 4), or on the LoRA recipe at the rank that matches the
mixture's trainable parameters (routers and head counted). Each run goes through
``accelerate launch -m mope.train`` like the demo. Results are appended one line per run to
``benchmarks/results/defaults_study.jsonl`` (so a long study can be stopped and continued: a
(task, variant, lr, seed) already there is skipped), and
``benchmarks/results/defaults_study.md`` is rewritten from all lines: per variant and learning
rate, mean accuracy over seeds, seeds run, trainable parameters, mean training time and load CV.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict

from demo_accuracy import mean_cv

from mope.demo import LAUNCH, RECIPES, launch
from mope.training import quiet_third_party

LORA = "lora r=20"
# The variants are changes to the demo's MoPE recipe as it was when the study began (top-2 of 8,
# r=2, alpha 4, routers at the experts' learning rate); the recipe has moved on since.
STUDY_BASE = [
    "adapter.config.router=top_k",
    "adapter.config.top_k=2",
    "adapter.config.lora_alpha=4",
    "training.router_lr_scale=1.0",
]
# --task: the demo's task, or a second one (finer labels) to check that a finding holds beyond it
TASKS = {"families": "builtin:stdlib_docstrings", "modules": "builtin:stdlib_modules"}
# BERT's encoder layers: one router per layer (block-level routing, on the layer's first adapted
# module's input) instead of one per projection; frees ~147k router parameters for experts.
PER_LAYER = "adapter.config.router_blocks=['layer\\.\\d+']"

# Fewer, larger experts: top-1 of 4 routed rank-4 experts plus one shared rank-4 expert, one router per layer.
TOP1_SHARED = [
    PER_LAYER,
    "adapter.config.num_experts=5",
    "adapter.config.num_shared_experts=1",
    "adapter.config.top_k=1",
    "adapter.config.top_k_order=softmax_then_topk_unnormalised",
    "adapter.config.r=4",
    "adapter.config.lora_alpha=8",
]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    LORA: ("lora", ["adapter.config.r=20", "adapter.config.lora_alpha=40"]),
    "lora r=4 (active rank of top-2 r=2)": ("lora", ["adapter.config.r=4", "adapter.config.lora_alpha=8"]),
    "top2": ("mope", []),
    "top2 alpha8": ("mope", ["adapter.config.lora_alpha=8"]),
    "top2 alpha16": ("mope", ["adapter.config.lora_alpha=16"]),
    "top2 seq": ("mope", ["adapter.config.routing_level=sequence"]),
    "top2 seq alpha16": ("mope", ["adapter.config.routing_level=sequence", "adapter.config.lora_alpha=16"]),
    "top2 no aux": ("mope", ["adapter.config.aux_loss_coef=0", "adapter.config.z_loss_coef=0"]),
    "top2 router lr x10": ("mope", ["training.router_lr_scale=10"]),
    "top2 router lr /10": ("mope", ["training.router_lr_scale=0.1"]),
    "top2 aux0.1": ("mope", ["adapter.config.aux_loss_coef=0.1"]),
    "top2 per-layer +2 shared": (
        "mope",
        [PER_LAYER, "adapter.config.num_experts=10", "adapter.config.num_shared_experts=2"],
    ),
    "top2 per-layer +2 shared alpha16": (
        "mope",
        [
            PER_LAYER,
            "adapter.config.num_experts=10",
            "adapter.config.num_shared_experts=2",
            "adapter.config.lora_alpha=16",
        ],
    ),
    "top1 of 4 r4 +1 shared per-layer": ("mope", TOP1_SHARED),
    "top1 of 4 r4 +1 shared per-layer router lr /10": ("mope", [*TOP1_SHARED, "training.router_lr_scale=0.1"]),
    "top1 of 4 r4 +1 shared per-layer router lr /10 alpha16": (
        "mope",
        [*TOP1_SHARED, "training.router_lr_scale=0.1", "adapter.config.lora_alpha=16"],
    ),
    "dense alpha64 router lr /10": (
        "mope",
        ["adapter.config.router=dense", "adapter.config.lora_alpha=64", "training.router_lr_scale=0.1"],
    ),
    "top2 per-layer +2 shared router lr /10": (
        "mope",
        [
            PER_LAYER,
            "adapter.config.num_experts=10",
            "adapter.config.num_shared_experts=2",
            "training.router_lr_scale=0.1",
        ],
    ),
    "dense": ("mope", ["adapter.config.router=dense"]),
    "dense alpha16": ("mope", ["adapter.config.router=dense", "adapter.config.lora_alpha=16"]),
    "dense alpha32": ("mope", ["adapter.config.router=dense", "adapter.config.lora_alpha=32"]),
    "dense alpha64": ("mope", ["adapter.config.router=dense", "adapter.config.lora_alpha=64"]),
    "dense alpha128": ("mope", ["adapter.config.router=dense", "adapter.config.lora_alpha=128"]),
    "dense alpha32 router lr /10": (
        "mope",
        ["adapter.config.router=dense", "adapter.config.lora_alpha=32", "training.router_lr_scale=0.1"],
    ),
    **{
        f"dense alpha{alpha} router lr /{div}": (
            "mope",
            [
                "adapter.config.router=dense",
                f"adapter.config.lora_alpha={alpha}",
                f"training.router_lr_scale={1 / div!r}",
            ],
        )
        for alpha, div in ((96, 10), (64, 3), (64, 30))
    },
    **{
        f"top2 alpha{alpha} router lr /10": (
            "mope",
            [f"adapter.config.lora_alpha={alpha}", "training.router_lr_scale=0.1"],
        )
        for alpha in (8, 16)
    },
}


def read_runs(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_table(runs: list[dict], path: str) -> str:
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run.get("task", "families"), run["variant"], run["learning_rate"])].append(run)
    lines = [
        "# Defaults study (MiniLM; stdlib docstrings, 10 classes)",
        "",
        "Written by benchmarks/defaults_study.py from defaults_study.jsonl (one line per run). Tasks: "
        "`families` = the demo's (10 package families), `modules` = 10 modules of three domains "
        "(concurrency, web, XML).",
        "",
        "| task | variant | lr | seeds | trainable | accuracy (mean) | min | max | train s (mean) | load CV |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != LORA, item[0][1:]))
    for (task, variant, lr), group in order:
        accuracy = [r["eval_accuracy"] for r in group]
        cvs = [r["load_cv"] for r in group if r.get("load_cv") is not None]
        cv = f"{statistics.mean(cvs):.3f}" if cvs else ""
        lines.append(
            f"| {task} | {variant} | {lr:g} | {len(group)} | {group[0]['trainable_parameters']:,} | "
            f"{statistics.mean(accuracy):.4f} | {min(accuracy):.4f} | {max(accuracy):.4f} | "
            f"{statistics.mean(r['train_seconds'] for r in group):.1f} | {cv} |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as handle:
        handle.write(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=[LORA, "top2"], choices=sorted(VARIANTS), metavar="NAME")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.002])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--task", default="families", choices=sorted(TASKS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the demo's, all cores)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args()
    if args.list:
        for name, (method, overrides) in VARIANTS.items():
            print(f"{name!r}: {method} {' '.join(overrides)}")
        return
    quiet_third_party()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        LAUNCH[LAUNCH.index("--num_cpu_threads_per_process") + 1] = str(args.threads)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "defaults_study.jsonl")
    done = {(r.get("task", "families"), r["variant"], r["learning_rate"], r["seed"]) for r in read_runs(log)}
    work = tempfile.mkdtemp(prefix="mope-study-")
    for lr in args.lrs:
        for variant in args.variants:
            method, overrides = VARIANTS[variant]
            for seed in args.seeds:
                if (args.task, variant, lr, seed) in done:
                    continue
                out = os.path.join(work, f"{variant.replace(' ', '_').replace('/', 'div')}-lr{lr}-s{seed}")
                common = [f"training.output_dir={out}", f"training.seed={seed}", f"training.learning_rate={lr}"]
                common.append(f"data.source={TASKS[args.task]}")
                base = STUDY_BASE if method == "mope" else []
                summary = launch(RECIPES[method], [*common, *base, *overrides])
                row = {
                    "task": args.task,
                    "variant": variant,
                    "learning_rate": lr,
                    "seed": seed,
                    "eval_accuracy": summary["eval_accuracy"],
                    "train_seconds": summary["train_seconds"],
                    "trainable_parameters": summary["trainable_parameters"],
                    "load_cv": mean_cv(os.path.join(out, "routing_summary.json")),
                }
                with open(log, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(write_table(read_runs(log), os.path.join(args.out, "defaults_study.md")), flush=True)


if __name__ == "__main__":
    main()
