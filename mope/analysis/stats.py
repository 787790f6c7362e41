"""``mope.routing_stats``: what the routers did, collected only while asked, kept on device.

    with mope.routing_stats(model) as stats:
        for batch in batches:
            model(**batch)
    report = stats.report()      # {module name: LayerStats as a dict}, read once at the end

Per adapted module (the router's own module; block followers share their leader's): expert load
(share of non-padding dispatch), expert weight (share of the gate weight, what ``mope.export_lora``'s usage
reads), mean gate entropy, drop rate, and drop rate by sequence
position (OpenMoE's "drop towards the end"), expert load by position. Hooks (:mod:`.hooks`) add a
few on-device reductions per router call; nothing is copied to the host until ``report()``.

A module whose router gave NaN/inf for any real token reports NaN for every share, rate and
entropy, and counts those tokens in ``nonfinite_tokens``: the top-k of a NaN row picks fixed
experts, so a NaN router's load would otherwise look plausible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..routing import Routing, RoutingInputs
from .hooks import RouterHooks, finite_tokens, token_mask


@dataclass
class LayerStats:
    load: list[float]  # share of dispatch per expert, sums to 1
    weight: list[float]  # share of the routed gate weight per expert, sums to 1 (load weighted by the gate)
    load_cv: float  # coefficient of variation of ``load``
    entropy: float  # mean per-token entropy of the router probabilities (nats)
    drop_rate: float  # dropped / requested (token, expert) pairs; 0 without capacity
    drop_rate_by_position: list[float]  # the same per sequence position
    load_by_position: list[list[float]]  # [position][expert]: share of dispatch at each sequence position
    tokens: int
    nonfinite_tokens: int  # real tokens whose router output held NaN/inf; if any, the statistics above are NaN


class Accumulator:
    """Running on-device sums for one router."""

    def __init__(self) -> None:
        self.load = self.weight = self.entropy = self.tokens = self.dropped = self.requested = None
        self.dropped_at = self.requested_at = self.load_at = self.nonfinite = None

    @staticmethod
    def add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if total is None else total + value

    @staticmethod
    def add_padded(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """Sum of per-position vectors whose lengths differ between batches."""
        if total is None:
            return value
        if value.shape[0] > total.shape[0]:
            total, value = value, total
        return torch.cat([total[: value.shape[0]] + value, total[value.shape[0] :]])

    def update(self, routing: Routing, inputs: RoutingInputs) -> None:
        probs = routing.probs.detach().float()
        real = token_mask(routing, inputs)
        keep = real.bool().unsqueeze(-1)  # where, not a product: a padding row's NaN times 0 is NaN
        token_load = torch.where(keep, routing.load.detach().float(), 0.0)
        self.load = self.add(self.load, token_load.reshape(-1, probs.shape[-1]).sum(0))
        token_weight = torch.where(keep, routing.weights.detach().float(), 0.0)
        self.weight = self.add(self.weight, token_weight.reshape(-1, probs.shape[-1]).sum(0))
        if token_load.dim() == 3:  # [batch, seq, N]: expert load by position
            self.load_at = self.add_padded(self.load_at, token_load.sum(0))
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        self.entropy = self.add(self.entropy, torch.where(real.bool(), entropy, 0.0).sum())
        self.tokens = self.add(self.tokens, real.sum())
        self.nonfinite = self.add(self.nonfinite, (real * ~finite_tokens(routing)).sum())
        if routing.dropped is None:
            return
        dropped = routing.dropped.float().sum(-1) * real
        requested = ((routing.weights != 0) | routing.dropped).float().sum(-1) * real
        self.dropped = self.add(self.dropped, dropped.sum())
        self.requested = self.add(self.requested, requested.sum())
        if dropped.dim() == 2:  # [batch, seq]
            self.dropped_at = self.add_padded(self.dropped_at, dropped.sum(0))
            self.requested_at = self.add_padded(self.requested_at, requested.sum(0))

    def result(self) -> LayerStats:
        stats = self.ratios()
        nonfinite = int(self.nonfinite.item())
        if nonfinite:
            stats = {key: nan_like(value) for key, value in stats.items()}
        return LayerStats(**stats, tokens=int(self.tokens.item()), nonfinite_tokens=nonfinite)

    def ratios(self) -> dict:
        """The shares, rates and entropy of :class:`LayerStats`, as computed from the sums."""
        load = self.load / self.load.sum().clamp_min(1e-12)
        weight = self.weight / self.weight.sum().clamp_min(1e-12)
        cv = (load.std(unbiased=False) / load.mean()).item() if load.numel() > 1 else 0.0
        drop_rate = 0.0 if self.dropped is None else (self.dropped / self.requested.clamp_min(1)).item()
        by_position = [] if self.dropped_at is None else (self.dropped_at / self.requested_at.clamp_min(1)).tolist()
        load_at = (
            []
            if self.load_at is None
            else (self.load_at / self.load_at.sum(-1, keepdim=True).clamp_min(1e-12)).tolist()
        )
        return {
            "load": load.tolist(),
            "weight": weight.tolist(),
            "load_cv": cv,
            "entropy": (self.entropy / self.tokens.clamp_min(1)).item(),
            "drop_rate": drop_rate,
            "drop_rate_by_position": by_position,
            "load_by_position": load_at,
        }


def nan_like(value: float | list) -> float | list:
    """``value`` with every number replaced by NaN, keeping its (nested) list shape."""
    return [nan_like(v) for v in value] if isinstance(value, list) else math.nan


class RoutingStats(RouterHooks["Accumulator"]):
    """Context manager: hooks every router of ``adapter_name`` while open."""

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        super().__init__(model, lambda router: Accumulator(), adapter_name)

    def __enter__(self) -> RoutingStats:
        return self

    def report(self) -> dict[str, dict]:
        """Per module: the statistics as plain Python values (one device-to-host copy per number)."""
        return {name: asdict(acc.result()) for name, acc in self.collectors.items() if acc.load is not None}


def routing_stats(model: nn.Module, adapter_name: str = "default") -> RoutingStats:
    """Start collecting routing statistics on ``model``; use as a context manager."""
    return RoutingStats(model, adapter_name)
