"""Expert load per layer over a set of batches (what the training loop writes to routing_summary.json)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .stats import RoutingStats


@torch.no_grad()
def expert_load(model: nn.Module, batches: Iterable[dict], adapter_name: str = "default") -> dict[str, dict]:
    """Per adapted module: expert shares of non-padding dispatch and their coefficient of variation."""
    with RoutingStats(model, adapter_name) as stats:
        for batch in batches:
            model(**batch)
    return {name: {"share": s["load"], "cv": s["load_cv"]} for name, s in stats.report().items()}
