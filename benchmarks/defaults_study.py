"""What makes a mixture pay on the demo task: a small study of MoPE defaults against an equal-size LoRA.

Run from the repository root, alone on the machine (offline, CPU; ~2.5 minutes per run on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/defaults_study.py --variants "lora r=20" top2 --lrs 0.002 0.005 --seeds 0
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/defaults_study.py --list          # the variants and their overrides
    ... defaults_study.py --task families modules ...   # also the second task (finer labels)
    ... --workers 15 --model DIR ...   # 15 runs at once, in-process (see study_on_device.sh)

Every variant is a set of recipe overrides on the demo's MoPE recipe as it was when the study began
(``STUDY_BASE``: top-2 of 8, r=2, alpha 4), or on the LoRA recipe at the rank that matches the
mixture's trainable parameters (routers and head counted). Each run goes through
``accelerate launch -m mope.train`` like the demo. Results are appended one line per run to
``benchmarks/results/defaults_study_cpu.jsonl`` (``defaults_study_h100.jsonl`` where a GPU trains; ``--name``
sets the stem; so a long study can be stopped and continued: a (task, variant, lr, seed) already there is
skipped), and ``benchmarks/results/defaults_study_cpu.md`` is rewritten from all lines: per variant and learning
rate, mean accuracy over seeds, seeds run, trainable parameters, mean training time and load CV.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
from collections import defaultdict

from demo_accuracy import mean_cv
from step_time import machine_tag

from mope.demo import RECIPES, launch
from mope.training import quiet_third_party
from mope.training.launch import LAUNCH

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

# The demo recipe since a36c15e: dense gate, alpha 64, routers at a tenth of the experts' learning rate.
DENSE = ["adapter.config.router=dense", "adapter.config.lora_alpha=64", "training.router_lr_scale=0.1"]

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
    "dense alpha64 router lr /10": ("mope", DENSE),
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
        for alpha, div in ((96, 10), (128, 10), (64, 3), (64, 30))
    },
    **{
        f"top2 alpha{alpha} router lr /10": (
            "mope",
            [f"adapter.config.lora_alpha={alpha}", "training.router_lr_scale=0.1"],
        )
        for alpha in (8, 16)
    },
    # Round 2 (run on a lent H100, figures committed in ef4460b): what the dense demo recipe's gain comes from,
    # and whether it holds on a second task.
    "lora r=20 alpha80": ("lora", ["adapter.config.r=20", "adapter.config.lora_alpha=80"]),
    "lora r=20 alpha160": ("lora", ["adapter.config.r=20", "adapter.config.lora_alpha=160"]),
    "dense 4x r4 alpha64 router lr /10": ("mope", [*DENSE, "adapter.config.num_experts=4", "adapter.config.r=4"]),
    "dense 16x r1 alpha64 router lr /10": ("mope", [*DENSE, "adapter.config.num_experts=16", "adapter.config.r=1"]),
    "dense alpha64 +1 shared router lr /10": ("mope", [*DENSE, "adapter.config.num_shared_experts=1"]),
    "dense alpha64 per-layer router lr /10": ("mope", [*DENSE, PER_LAYER]),
    "dense alpha64 router zeros lr /10": ("mope", [*DENSE, "adapter.config.router_init=zeros"]),
    # a fixed uniform gate: the same experts and scale, no routing (router starts at zero and does not learn)
    "dense alpha64 uniform (router frozen)": (
        "mope",
        [*DENSE, "adapter.config.router_init=zeros", "training.router_lr_scale=1e-9"],
    ),
    "dense alpha64 temperature 2 router lr /10": ("mope", [*DENSE, "adapter.config.router_temperature=2"]),
    "dense alpha64 no aux router lr /10": (
        "mope",
        [*DENSE, "adapter.config.aux_loss_coef=0", "adapter.config.z_loss_coef=0"],
    ),
    "dense alpha64 per-layer temperature 2 router lr /10": (
        "mope",
        [*DENSE, PER_LAYER, "adapter.config.router_temperature=2"],
    ),
    "dense alpha128 per-layer router lr /10": ("mope", [*DENSE, PER_LAYER, "adapter.config.lora_alpha=128"]),
    "dense alpha64 sequence-level router lr /10": ("mope", [*DENSE, "adapter.config.routing_level=sequence"]),
    # dense-to-sparse: top-8 at step 0, annealed to top-2 over the first 60 optimizer steps (one process, no
    # accumulation or probe: the 60 training forwards the results were measured with, when recipes still allowed
    # the 'forward' counter)
    "top2 alpha16 router lr /10 dense-to-sparse": (
        "mope",
        [
            "adapter.config.lora_alpha=16",
            "training.router_lr_scale=0.1",
            "adapter.config.router_schedule_steps=60",
            "adapter.config.router_schedule_start_top_k=8",
            "adapter.config.router_schedule_counter=manual",
        ],
    ),
}


def key(row: dict) -> tuple:
    """What identifies a run: task, global settings, variant, learning rate, seed."""
    settings = tuple(row.get("settings", []))
    return (row.get("task", "families"), settings, row["variant"], row["learning_rate"], row["seed"])


def read_runs(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_table(runs: list[dict], path: str) -> str:
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for run in runs:
        task = " ".join([run.get("task", "families"), *run.get("settings", [])])
        groups[(task, run["variant"], run["learning_rate"])].append(run)
    machines = sorted({f"{r['machine']} ({r['workers']} runs at once)" for r in runs if r.get("machine")})
    lines = [
        "# Defaults study (MiniLM; stdlib docstrings, 10 classes)",
        "",
        f"Written by benchmarks/defaults_study.py from {os.path.basename(path)[:-3]}.jsonl (one line per run). Tasks: "
        "`families` = the demo's (10 package families), `modules` = 10 modules of three domains "
        "(concurrency, web, XML); settings applied to every run follow the task's name.",
        "",
        *([f"Machines: {'; '.join(machines)}.", ""] if machines else []),
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


def run_in_process(job: tuple[str, list[str], int]) -> dict:
    """One run in a worker process (``--workers``): the same loop ``mope.train`` runs, without the launcher."""
    import torch

    from mope.training.loop import run
    from mope.training.recipe import load_recipe

    recipe, overrides, threads = job
    torch.set_num_threads(threads)
    summary = run(load_recipe(recipe, overrides))
    summary["machine"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return summary


def try_run(job: tuple[int, str, list[str], int]) -> tuple[int, dict | None, str | None]:
    """``run_in_process`` for the pool: ``(job index, summary, None)``, or ``(index, None, the error)``."""
    index, *rest = job
    try:
        return index, run_in_process(tuple(rest)), None
    except Exception as error:
        return index, None, repr(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=[LORA, "top2"], choices=sorted(VARIANTS), metavar="NAME")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.002])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--task", nargs="+", default=["families"], choices=sorted(TASKS))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run (recorded)")
    parser.add_argument("--model", help="model.name_or_path for every run (recorded), e.g. a local copy of MiniLM")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--name", help="stem of the .jsonl log and .md table in --out (default: defaults_study_cpu, _h100 on an H100)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the demo's, all cores)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run this many runs at once, in-process in worker processes (0: each "
        "run through accelerate launch, one at a time); their train times are then not comparable",
    )
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
    settings = [*args.set, *([f"model.name_or_path={args.model}"] if args.model else [])]
    os.makedirs(args.out, exist_ok=True)
    args.name = args.name or f"defaults_study_{machine_tag()}"
    log = os.path.join(args.out, f"{args.name}.jsonl")
    jobs = plan(args, settings, done={key(r) for r in read_runs(log)})

    def record(row: dict, summary: dict, out: str) -> None:
        row = {**row, **{k: summary[k] for k in ("eval_accuracy", "train_seconds", "trainable_parameters")}}
        row["load_cv"] = mean_cv(os.path.join(out, "routing_summary.json"))
        row.update({"machine": summary.get("machine", platform.processor()), "workers": args.workers})
        with open(log, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        table = write_table(read_runs(log), os.path.join(args.out, f"{args.name}.md"))
        brief = (
            f"{row['variant']} lr {row['learning_rate']:g} seed {row['seed']} {row['task']}: {row['eval_accuracy']:.4f}"
        )
        print(brief if args.workers else table, flush=True)

    if not args.workers:
        for row, recipe, overrides, out in jobs:
            record(row, launch(recipe, overrides), out)
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    # `kill PID` (SIGTERM) then leaves the pool's block, whose exit terminates the workers too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=quiet_third_party) as pool:
        work = [(i, recipe, o, threads) for i, (_, recipe, o, _) in enumerate(jobs)]
        for i, summary, error in pool.imap_unordered(try_run, work):
            row, _, _, out = jobs[i]
            if error is None:
                try:
                    record(row, summary, out)
                    continue
                except Exception as failure:
                    error = repr(failure)
            print(f"FAILED {row}: {error}", flush=True)  # one failed run is reported; the rest of the study goes on


def plan(args: argparse.Namespace, settings: list[str], done: set[tuple]) -> list[tuple[dict, str, list[str], str]]:
    """``(row, recipe, overrides, output_dir)`` per run not in ``done``; seeds outermost, so a study cut short
    has whole seeds."""
    work = tempfile.mkdtemp(prefix="mope-study-")
    jobs = []
    for seed in args.seeds:
        for task in args.task:
            for variant in args.variants:
                for lr in args.lrs:
                    row = {"task": task, "settings": settings, "variant": variant, "learning_rate": lr, "seed": seed}
                    if key(row) in done:
                        continue
                    method, overrides = VARIANTS[variant]
                    out = os.path.join(work, f"{len(jobs)}-{variant.replace(' ', '_').replace('/', 'div')}")
                    common = [f"training.output_dir={out}", f"training.seed={seed}", f"training.learning_rate={lr}"]
                    common.append(f"data.source={TASKS[task]}")
                    base = STUDY_BASE if method == "mope" else []
                    jobs.append((row, RECIPES[method], [*common, *base, *overrides, *settings], out))
    return jobs


if __name__ == "__main__":
    main()
