"""What collapsing a trained top-2 mixture into one LoRA costs in accuracy, on the demo task.

Run from the repository root (offline, CPU):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/collapse_accuracy.py --bundle /tmp/collapse_run/bundle
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/collapse_accuracy.py            # trains the recipe first (~3-10 min)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/collapse_accuracy.py --quick    # smoke run: 2 steps, 32 examples

The mixture is the MoPE recipe (``recipes/offline/minilm_stdlib_mope.yaml``) made top-2 of 8 LoRA experts
of rank 2 on every linear layer of MiniLM, i.e. N·r = 16, alpha 4 (``TOP2``: the demo recipe when the figures were
measured; it is dense now). Expert usage per module is the ``weight`` (share of the gate weight) that
:func:`mope.routing_stats` reports over the *training* split; each variant is exported with
:func:`mope.export_lora`, loaded back with plain ``PeftModel.from_pretrained`` and scored on the held-out split: accuracy, and agreement with the mixture's own predictions.
Variants: ``concat`` (the exact usage-weighted average of the experts' updates, rank 16),
``svd`` truncations of it, and ``concat`` with uniform usage (what usage statistics buy).
Writes ``DIR/collapse_accuracy_cpu.json`` and ``.md`` (``_h100`` etc. where a GPU trains; default DIR:
benchmarks/results) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile

import torch
from peft import PeftModel
from step_time import machine_tag
from torch.utils.data import DataLoader

import mope
from mope.demo import RECIPES
from mope.training import quiet_third_party
from mope.training.data import Collator, load_examples
from mope.training.launch import launch_command
from mope.training.models import build_model, load_tokenizer
from mope.training.recipe import load_recipe

QUICK = ["training.max_steps=2", "training.epochs=null", "data.max_examples=32"]
# the mixture the published figures measured: the demo recipe before the defaults study made it dense (a36c15e)
TOP2 = [
    "adapter.config.router=top_k",
    "adapter.config.top_k=2",
    "adapter.config.lora_alpha=4",
    "training.router_lr_scale=1.0",
]


def variants(ranks: list[int]) -> dict[str, dict]:
    """Table label -> collapse_to_lora options (``usage`` filled in from the statistics, unless uniform)."""
    table = {"concat (exact average, rank N·r)": {"method": "concat"}}
    table.update({f"svd rank {r}": {"method": "svd", "rank": r} for r in ranks})
    table["concat, uniform usage"] = {"method": "concat", "uniform": True}
    return table


@torch.no_grad()
def predictions(model, loader) -> tuple[list[int], list[int]]:
    predicted, labels = [], []
    for batch in loader:
        predicted += model(**batch).logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    return predicted, labels


def score(predicted: list[int], labels: list[int], reference: list[int]) -> dict[str, float]:
    n = max(len(labels), 1)
    return {
        "accuracy": sum(p == y for p, y in zip(predicted, labels, strict=True)) / n,
        "agreement_with_mixture": sum(p == q for p, q in zip(predicted, reference, strict=True)) / n,
    }


def train(recipe: str, out_dir: str, quick: bool) -> str:
    overrides = [f"training.output_dir={out_dir}", *TOP2, *(QUICK if quick else [])]
    subprocess.run(launch_command(recipe, overrides), check=True)
    return os.path.join(out_dir, "bundle")


def measure(recipe_path: str, bundle: str, ranks: list[int], quick: bool) -> dict:
    recipe = load_recipe(recipe_path, [*TOP2, *(QUICK if quick else [])])
    examples = load_examples(recipe.data, recipe.model.task)
    tokenizer = load_tokenizer(recipe.model)
    collate = Collator(tokenizer, recipe.data, recipe.model.task, examples.labels)

    def base():
        model = build_model(recipe.model, len(examples.labels), recipe.training.seed)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def loader(rows):
        return DataLoader(rows, batch_size=recipe.training.eval_batch_size, collate_fn=collate)

    mixture = mope.load_mope(base(), bundle).eval()
    with mope.routing_stats(mixture) as stats:
        predictions(mixture, loader(examples.train))
    usage = stats.report()
    reference, labels = predictions(mixture, loader(examples.eval))
    rows = [{"variant": "mixture (top-2 of 8)", "rank": None, **score(reference, labels, reference)}]
    with tempfile.TemporaryDirectory() as folder:
        for label, options in variants(ranks).items():
            options = dict(options)
            uniform = options.pop("uniform", False)
            config = mope.export_lora(mixture, folder, usage=None if uniform else usage, **options)
            lora = PeftModel.from_pretrained(base(), config).eval()
            r = json.loads((config / "adapter_config.json").read_text())["r"]
            rows.append(
                {"variant": label, "rank": r, **score(predictions(lora, loader(examples.eval))[0], labels, reference)}
            )
    return {"rows": rows, "eval_examples": len(labels), "train_examples": len(examples.train)}


def markdown(result: dict) -> str:
    lines = [
        f"Collapse of the demo mixture into one LoRA: held-out accuracy on {result['eval_examples']} examples "
        f"(usage from routing_stats on {result['train_examples']} training examples). "
        f"{result['machine']}, torch {result['torch']}.",
        "",
        "| variant | LoRA rank | accuracy | agreement with mixture |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        rank = "-" if row["rank"] is None else str(row["rank"])
        lines.append(f"| {row['variant']} | {rank} | {row['accuracy']:.3f} | {row['agreement_with_mixture']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=RECIPES["mope"])
    parser.add_argument("--bundle", help="a trained bundle of the recipe (default: train one now)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--quick", action="store_true", help="2 training steps on 32 examples: a smoke test")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_third_party()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle or train(args.recipe, os.path.join(scratch, "run"), args.quick)
        result = measure(args.recipe, bundle, args.ranks, args.quick)
    machine = f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, {platform.system()}"
    result.update(bundle=args.bundle, quick=args.quick, machine=machine, torch=torch.__version__)
    os.makedirs(args.out, exist_ok=True)
    stem = f"collapse_accuracy_{machine_tag()}"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    table = markdown(result)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
