"""Accuracy, training time and expert balance on the demo task, over seeds and methods.

Run from the repository root (offline, CPU; about 2.5 minutes per run on 2 cores, so the
default 3 seeds x 3 methods take ~25 minutes: run it alone, see ../shared/MEASURING.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_accuracy.py [--seeds 0 1 2] [--lrs 0.002 ...]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_accuracy.py --quick      # smoke run

Methods, at equal trainable parameters (routers and the classifier head counted): the demo's
MoPE recipe (a dense gate over 8 rank-2 experts), the same experts under a top-2 gate, and one
PEFT LoRA whose rank the demo picks to match; each at its own best learning rate from the
defaults study (or every method at each of ``--lrs``). Every run goes through
``accelerate launch -m mope.train``. Writes
``benchmarks/results/demo_accuracy_cpu.json`` and ``.md`` (``_h100`` etc. where a GPU trains): per method, mean and spread of held-out
accuracy and training time over seeds, at each learning rate, and the mean coefficient of
variation of the expert load per layer (mixtures only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile

import torch
from step_time import machine_tag

from mope.demo import RECIPES, launch, matching_lora_rank
from mope.training import quiet_third_party
from mope.training.data import load_examples
from mope.training.recipe import load_recipe

# name -> (recipe, overrides, the method's best learning rate in the defaults study's screen)
METHODS = {
    "mope dense 8, r=2, alpha 64, router lr /10 (demo recipe)": (RECIPES["mope"], [], 0.002),
    "mope top-2 of 8, r=2, alpha 4, router lr /10": (
        RECIPES["mope"],
        ["adapter.config.router=top_k", "adapter.config.top_k=2", "adapter.config.lora_alpha=4"],
        0.005,
    ),
    "lora": (RECIPES["lora"], None, 0.002),  # rank filled in to match
}


def module_cvs(routing_summary: str) -> dict[str, float]:
    """Expert load CV of each adapted module, from a run's ``routing_summary.json`` (empty for LoRA runs)."""
    if not os.path.exists(routing_summary):
        return {}
    with open(routing_summary) as handle:
        return {name: load["cv"] for name, load in json.load(handle).items()}


def layer_cvs(routing_summary: str) -> dict[str, float]:
    """Mean load CV of each encoder layer's adapted modules (``...layer.<i>...``; the rest under "other")."""
    by_layer: dict[str, list[float]] = {}
    for name, cv in module_cvs(routing_summary).items():
        match = re.search(r"\.layers?\.(\d+)\.", name)
        by_layer.setdefault(match.group(1) if match else "other", []).append(cv)
    return {layer: statistics.mean(cvs) for layer, cvs in sorted(by_layer.items(), key=lambda kv: (len(kv[0]), kv[0]))}


def mean_cv(routing_summary: str) -> float | None:
    cvs = module_cvs(routing_summary)
    return statistics.mean(cvs.values()) if cvs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates for every method (default: each method's own best)"
    )
    parser.add_argument("--quick", action="store_true", help="2 steps on 32 examples: a smoke test")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_third_party()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    num_labels = len(load_examples(load_recipe(RECIPES["mope"]).data, "sequence_classification").labels)
    rank, _, _ = matching_lora_rank(num_labels)
    quick = ["training.max_steps=2", "training.epochs=null", "data.max_examples=32"] if args.quick else []
    work = tempfile.mkdtemp(prefix="mope-demo-bench-")
    rows = []
    plan = [(lr, name) for lr in args.lrs for name in METHODS] if args.lrs else [(m[2], n) for n, m in METHODS.items()]
    for lr, name in plan:
        recipe, extra, _ = METHODS[name]
        extra = extra if extra is not None else [f"adapter.config.r={rank}", f"adapter.config.lora_alpha={2 * rank}"]
        runs = []
        for seed in args.seeds:
            out = os.path.join(work, f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}-lr{lr}-s{seed}")
            overrides = [f"training.output_dir={out}", f"training.seed={seed}", f"training.learning_rate={lr}"]
            summary = launch(recipe, [*overrides, *extra, *quick])
            summary["load_cv"] = mean_cv(os.path.join(out, "routing_summary.json"))
            summary["load_cv_by_layer"] = layer_cvs(os.path.join(out, "routing_summary.json"))
            runs.append(summary)
        accuracy = [r["eval_accuracy"] for r in runs]
        seconds = [r["train_seconds"] for r in runs]
        cvs = [r["load_cv"] for r in runs if r["load_cv"] is not None]
        rows.append(
            {
                "method": name,
                "learning_rate": lr,
                "trainable_parameters": runs[0]["trainable_parameters"],
                "accuracy_mean": statistics.mean(accuracy),
                "accuracy_spread": max(accuracy) - min(accuracy),
                "train_seconds_mean": statistics.mean(seconds),
                "load_cv_mean": statistics.mean(cvs) if cvs else None,
                "load_cv_by_layer": {
                    layer: statistics.mean(r["load_cv_by_layer"][layer] for r in runs)
                    for layer in runs[0]["load_cv_by_layer"]
                },
                "seeds": args.seeds,
                "runs": runs,
            }
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "lora_rank": rank,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = f"demo_accuracy_{machine_tag()}"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as handle:
        json.dump({"machine": machine, "rows": rows}, handle, indent=1)
    lines = [
        "# Demo task: accuracy over seeds",
        "",
        f"Machine: {machine}",
        "",
        "| method | lr | trainable | accuracy (mean) | spread | train s (mean) | load CV |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cv = "" if r["load_cv_mean"] is None else f"{r['load_cv_mean']:.3f}"
        lines.append(
            f"| {r['method']} | {r['learning_rate']} | {r['trainable_parameters']:,} | {r['accuracy_mean']:.4f} | "
            f"{r['accuracy_spread']:.4f} | {r['train_seconds_mean']:.1f} | {cv} |"
        )
    mixtures = [r for r in rows if r["load_cv_by_layer"]]
    if mixtures:
        layers = list(mixtures[0]["load_cv_by_layer"])
        lines += [
            "",
            "Expert load balance per encoder layer: coefficient of variation of the experts' token shares on the",
            "held-out set (0 = even), mean over the layer's adapted modules and over seeds.",
            "",
            "| method | lr | " + " | ".join(f"layer {x}" if x.isdigit() else "other modules" for x in layers) + " |",
            "|---|---|" + "---|" * len(layers),
        ]
        lines += [
            f"| {r['method']} | {r['learning_rate']} | "
            + " | ".join(f"{r['load_cv_by_layer'].get(layer, float('nan')):.3f}" for layer in layers)
            + " |"
            for r in mixtures
        ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
