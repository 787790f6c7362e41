"""Recipes, data and the accelerate loop behind ``accelerate launch -m mope.train``."""

from __future__ import annotations

import warnings

from ..extras import require_extra

require_extra("train", "accelerate", "yaml", "pydantic", "datasets", "tqdm")


def quiet_third_party() -> None:
    """Silence load reports and progress bars and a PEFT/transformers deprecation that users cannot act on."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
