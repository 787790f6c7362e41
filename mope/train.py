"""Train a recipe: ``accelerate launch -m mope.train --recipe recipes/<name>.yaml [key.path=value ...]``.

Examples:
    accelerate launch -m mope.train --recipe recipes/offline/tiny_llama.yaml training.max_steps=20
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m mope.train --recipe ...
    accelerate launch -m mope.train --recipe ... --resume_from_checkpoint latest

Writes to ``training.output_dir``: ``bundle/`` (adapter_config.json + adapter_model.safetensors),
``metrics.jsonl``, ``summary.json``, ``routing_summary.json`` and ``checkpoints/``.

Exit codes: 0 done, 2 a recipe error, 3 the training diverged (a NaN/inf loss or adapter weight).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .training import quiet_third_party
from .training.loop import TrainingDiverged, run
from .training.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mope.train", description="Train a MoPE (or LoRA) recipe.")
    parser.add_argument("--recipe", required=True, help="path to a recipe YAML")
    parser.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder or 'latest'")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. training.max_steps=10")
    args = parser.parse_intermixed_args(argv)  # overrides on both sides of --resume_from_checkpoint
    quiet_third_party()
    overrides = list(args.overrides)
    if args.resume_from_checkpoint:
        overrides.append(f"training.resume_from_checkpoint={args.resume_from_checkpoint}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        summary = run(recipe)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:  # its own code: the recipe was valid, the run went to NaN/inf
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:  # as accelerate's end_training does: NCCL warns at exit of a group left alive
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "rank_checksums"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
