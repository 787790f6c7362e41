"""The command that trains a recipe in a fresh process: ``accelerate launch -m mope.train``.

Used by ``mope train`` and by the demo and benchmarks that train recipes side by side. A run
starts only after :func:`checked_recipe` has checked everything it can in the launching process:
``accelerate launch`` and the import of the training loop take tens of seconds, and a typo found
there would cost that much and come wrapped in the launcher's traceback.
"""

from __future__ import annotations

import os
import sys

from .data import load_examples, source_kind
from .models import adapter_config, check_model, check_quantization
from .recipe import Recipe, RecipeError, TrainingSection, load_recipe

# accelerate launch gives a single process one CPU thread unless told otherwise. --quiet: a
# failed run shows the run's own error, without the launcher's CalledProcessError traceback.
LAUNCH = ["-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--num_machines", "1"]
LAUNCH += [
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--num_cpu_threads_per_process",
    str(os.cpu_count() or 1),
]


def launch_command(recipe: str, overrides: list[str]) -> list[str]:
    """``python -m accelerate.commands.launch ... -m mope.train --recipe RECIPE overrides...``."""
    return [sys.executable, *LAUNCH, "-m", "mope.train", "--recipe", recipe, *overrides]


def check_folders(training: TrainingSection) -> None:
    """``output_dir`` can be a folder; a checkpoint to resume from (other than ``latest``) exists."""
    if os.path.exists(training.output_dir) and not os.path.isdir(training.output_dir):
        raise RecipeError(f"training.output_dir: '{training.output_dir}' is a file; name a folder")
    resume = training.resume_from_checkpoint
    if resume is not None and resume != "latest" and not os.path.isdir(resume):
        raise RecipeError(
            f"training.resume_from_checkpoint: folder '{resume}' does not exist (pass a checkpoint folder or 'latest')"
        )


def checked_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """The recipe, with every part checked that can be without building the model: a RecipeError naming the field.

    - the file and overrides against the schema (:func:`load_recipe`, duplicate keys included);
    - ``adapter.config`` built as the MoPEConfig / LoraConfig the run will build;
    - the model, tokenizer and data locations exist (a hub id is left to the run);
    - ``model.quantization``: bitsandbytes is installed (>= 0.50);
    - a local data file is read in full: empty, malformed or missing a column fails here;
    - ``training.output_dir`` is not a file; ``resume_from_checkpoint`` exists.
    """
    recipe = load_recipe(path, overrides)
    adapter_config(recipe.adapter, recipe.model.task)
    check_model(recipe.model)
    check_quantization(recipe.model)
    if source_kind(recipe.data.source) == "file":  # built-in tasks take seconds to build; the run does it
        load_examples(recipe.data, recipe.model.task)
    check_folders(recipe.training)
    return recipe
