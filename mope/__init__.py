"""mope: mixtures of parameter-efficient experts as a PEFT method.

Importing ``mope`` registers ``peft_type="MOPE"`` with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle MoPE bundles. It
changes nothing else of PEFT or transformers. The core needs torch, peft, transformers and
safetensors; the training loop, the ``mope`` command and the plots are extras
(``mope[train]``, ``mope[cli]``, ``mope[plots]``).
"""

from __future__ import annotations

from .analysis import routing_stats
from .api import get_mope_model, load_mope
from .bundles import save_pretrained
from .config import MoPEConfig
from .dispatch import set_dispatch
from .export import collapse_to_lora, export_lora
from .integrations import RoutingLogCallback, head_only, log_routing
from .layer import MoPELayer
from .registration import register
from .reuse import from_lora_adapters
from .routing import ROUTERS, Router, Routing
from .routing.fixed_task import fix_task
from .routing.schedule import ScheduleCallback, step_schedule
from .tuner import MoPEModel
from .version import MOPE_VERSION

register(MoPEConfig, MoPEModel)  # the one thing importing mope does besides defining names; no PEFT class is patched

__version__ = MOPE_VERSION

__all__ = [
    "ROUTERS",
    "MoPEConfig",
    "MoPELayer",
    "MoPEModel",
    "Router",
    "Routing",
    "RoutingLogCallback",
    "ScheduleCallback",
    "__version__",
    "collapse_to_lora",
    "export_lora",
    "fix_task",
    "from_lora_adapters",
    "get_mope_model",
    "head_only",
    "load_mope",
    "log_routing",
    "routing_stats",
    "save_pretrained",
    "set_dispatch",
    "step_schedule",
]
