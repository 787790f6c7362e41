"""The command that trains a recipe in a fresh process: ``accelerate launch -m mope.train``.

Used by ``mope train`` and by the demo and benchmarks that train recipes side by side.
"""

from __future__ import annotations

import os
import sys

# accelerate launch gives a single process one CPU thread unless told otherwise.
LAUNCH = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
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
