"""Predict the eval split of a classification recipe with a saved bundle, in a fresh process.

    python -m mope.predict --recipe RECIPE --bundle DIR --out predictions.json

Used by the demo to check that a bundle reloaded in a new process gives the training run's
predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

from .api import load_mope
from .training import quiet_third_party
from .training.data import Collator, id_bounds, load_examples
from .training.models import adapter_config, build_model, load_tokenizer
from .training.recipe import RecipeError, load_recipe


@torch.no_grad()
def predict(recipe_path: str, bundle: str, overrides: list[str] = ()) -> tuple[list[int], list[str]]:
    """Each eval example's predicted class id, and the class names (as the training run's predictions.json)."""
    recipe = load_recipe(recipe_path, overrides)
    if recipe.model.task != "sequence_classification":  # refused before any data or model is loaded
        raise RecipeError(
            f"mope.predict supports classification recipes only (model.task sequence_classification): it writes "
            f"each eval example's predicted label; {recipe_path} has model.task {recipe.model.task}"
        )
    if recipe.adapter.method != "mope":
        raise RecipeError(
            f"mope.predict loads MoPE bundles; {recipe_path} trains adapter.method {recipe.adapter.method!r} (load "
            "its bundle with peft.PeftModel.from_pretrained)"
        )
    examples = load_examples(
        recipe.data, recipe.model.task, id_bounds(recipe.data, adapter_config(recipe.adapter, recipe.model.task))
    )
    tokenizer = load_tokenizer(recipe.model)
    base = build_model(recipe.model, examples.labels, recipe.training.seed)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    model = load_mope(base, bundle).eval()
    loader = DataLoader(
        examples.eval,
        batch_size=recipe.training.eval_batch_size,
        collate_fn=Collator(tokenizer, recipe.data, recipe.model.task, examples.labels),
    )
    return [p for batch in loader for p in model(**batch).logits.argmax(-1).tolist()], examples.labels


def main(argv: list[str] | None = None) -> int:
    """0 with the predictions (and class names) written to ``--out``; 2 and one ``error:`` line for a recipe,
    bundle or ``--out`` it cannot use."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):  # before predicting, not after
            raise RecipeError(f"--out: folder {folder} does not exist")
        predictions, labels = predict(args.recipe, args.bundle, args.overrides)
    except (ValueError, OSError) as error:  # RecipeError, a bundle that does not load or fit: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    with open(args.out, "w") as handle:  # opened only now: a failed run leaves no empty file behind
        json.dump({"labels": labels, "predictions": predictions}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
