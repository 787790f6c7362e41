"""One pass over the data, every per-router analysis: what ``mope stats`` prints and writes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .hooks import RouterHooks
from .specialization import TokenExpertCounts
from .stats import RoutingStats


@torch.no_grad()
def routing_report(model: nn.Module, batches: Iterable[dict], adapter_name: str = "default") -> dict[str, dict]:
    """Per module: :class:`~mope.analysis.stats.LayerStats` fields plus token-id specialisation (when token ids exist).

    Both collectors hook the same router calls, so ``batches`` is read once (an iterator is fine).
    """
    with RoutingStats(model, adapter_name) as stats, RouterHooks(model, TokenExpertCounts, adapter_name) as ids:
        for batch in batches:
            model(**batch)
    report = stats.report()
    for name, counts in ids.collectors.items():
        if name in report and counts.counts is not None:
            report[name].update(counts.result())
    return report
