"""mope: mixtures of parameter-efficient experts as a PEFT method.

Importing ``mope`` registers ``peft_type="MOPE"`` with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle MoPE bundles.
"""

from __future__ import annotations

from .bundles import save_pretrained
from .config import MoPEConfig
from .dispatch import set_dispatch
from .forward_inputs import install as install_forward_inputs
from .layer import MoPELayer
from .registration import register
from .routing import ROUTERS, Router, Routing
from .routing.schedule import step_schedule
from .tuner import MoPEModel

register()
install_forward_inputs()  # let model(..., task_ids=...) reach MoPE through PEFT's task classes

from .analysis import routing_stats  # noqa: E402
from .api import get_mope_model, load_mope  # noqa: E402
from .export import collapse_to_lora, export_lora  # noqa: E402
from .reuse import from_lora_adapters  # noqa: E402
from .routing.fixed_task import fix_task  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ROUTERS",
    "MoPEConfig",
    "MoPELayer",
    "MoPEModel",
    "Router",
    "Routing",
    "__version__",
    "collapse_to_lora",
    "export_lora",
    "fix_task",
    "from_lora_adapters",
    "get_mope_model",
    "load_mope",
    "routing_stats",
    "save_pretrained",
    "set_dispatch",
    "step_schedule",
]
