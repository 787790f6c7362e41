"""The command that trains a recipe in a fresh process: ``accelerate launch -m mope.train``.

Used by ``mope train`` and by the demo and benchmarks that train recipes side by side. A run
starts only after :func:`checked_recipe` has checked everything it can in the launching process:
``accelerate launch`` and the import of the training loop take tens of seconds, and a typo found
there would cost that much and come wrapped in the launcher's traceback.
"""

from __future__ import annotations

import os
import sys

from .data import id_bounds, load_examples, source_kind
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


# What a run writes into output_dir (docs/training.md "What a run writes"): a folder holding one is an earlier run.
RUN_FILES = ("metrics.jsonl", "summary.json", "routing_summary.json", "predictions.json", "bundle", "checkpoints")


def earlier_run(output_dir: str) -> list[str]:
    """The files of an earlier run in ``output_dir`` (none for a new or empty folder)."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def check_folders(training: TrainingSection) -> None:
    """``output_dir`` is a folder, new or resumed (or overwritten); a checkpoint to resume from is one.

    A new run in a folder holding an earlier one mixed both runs' ``metrics.jsonl``, pruned the new
    run's checkpoints in favour of the old run's later steps, and ``latest`` then resumed the old run.
    """
    out = training.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise RecipeError(f"training.output_dir: '{out}' is a file; name a folder")
    found = earlier_run(out)
    if found and training.resume_from_checkpoint is None and not training.overwrite_output_dir:
        raise RecipeError(
            f"training.output_dir: '{out}' holds an earlier run ({', '.join(found)}): resume it "
            "(training.resume_from_checkpoint=latest), name a new folder, or set training.overwrite_output_dir=true"
        )
    resume = training.resume_from_checkpoint
    if resume is None or resume == "latest":
        return
    if not os.path.isdir(resume):
        raise RecipeError(
            f"training.resume_from_checkpoint: folder '{resume}' does not exist (pass a checkpoint folder or 'latest')"
        )
    if not os.path.isfile(os.path.join(resume, "custom_checkpoint_0.pkl")):  # the data position, in every one
        hint = f" such as '{latest}'" if (latest := latest_in(resume)) else ""
        raise RecipeError(
            f"training.resume_from_checkpoint: '{resume}' is not a checkpoint (checkpoints/step-N of a run); pass "
            f"one{hint}, or 'latest' to continue the run of training.output_dir"
        )


def checkpoint_steps(folder: str) -> list[int]:
    """The steps of the complete checkpoints in ``folder``: ``step-N``; one cut off while it was written is
    still ``step-N.partial`` (:meth:`mope.training.loop.Run.save_checkpoint` renames it when it is whole)."""
    if not os.path.isdir(folder):
        return []
    names = (n.removeprefix("step-") for n in os.listdir(folder) if n.startswith("step-"))
    return sorted(int(n) for n in names if n.isdigit())


def latest_checkpoint(folder: str) -> str | None:
    """The latest complete checkpoint in a run's ``checkpoints`` folder."""
    steps = checkpoint_steps(folder)
    return os.path.join(folder, f"step-{steps[-1]}") if steps else None


def latest_in(folder: str) -> str | None:
    """The latest complete ``step-N`` in a checkpoints folder or the run folder above it, if any."""
    return latest_checkpoint(os.path.join(folder, "checkpoints")) or latest_checkpoint(folder)


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
    config = adapter_config(recipe.adapter, recipe.model.task)
    check_model(recipe.model)
    check_quantization(recipe.model)
    if source_kind(recipe.data.source) == "file":  # built-in tasks take seconds to build; the run does it
        load_examples(recipe.data, recipe.model.task, id_bounds(recipe.data, config))
    check_folders(recipe.training)
    return recipe
