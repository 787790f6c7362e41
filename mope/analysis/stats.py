"""``mope.routing_stats``: what the routers did, collected only while asked, kept on device.

    with mope.routing_stats(model) as stats:
        for batch in batches:
            model(**batch)
    report = stats.report()      # {module name: LayerStats as a dict}, read once at the end

Per adapted module (the router's own module; block followers share their leader's): expert load
(share of non-padding dispatch), mean gate entropy, drop rate, and drop rate by sequence
position (OpenMoE's "drop towards the end"). Hooks add a few on-device reductions per router
call; nothing is copied to the host until ``report()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..routing import Routing, RoutingInputs


@dataclass
class LayerStats:
    load: list[float]  # share of dispatch per expert, sums to 1
    load_cv: float  # coefficient of variation of ``load``
    entropy: float  # mean per-token entropy of the router probabilities (nats)
    drop_rate: float  # dropped / requested (token, expert) pairs; 0 without capacity
    drop_rate_by_position: list[float]  # the same per sequence position
    tokens: int


class Accumulator:
    """Running on-device sums for one router."""

    def __init__(self) -> None:
        self.load = self.entropy = self.tokens = self.dropped = self.requested = None
        self.dropped_at = self.requested_at = None

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

    def update(self, routing: Routing, mask: torch.Tensor | None) -> None:
        probs = routing.probs.detach().float()
        real = torch.ones(probs.shape[:-1], device=probs.device) if mask is None else mask.to(probs.device).float()
        flat_real = real.reshape(-1, 1)
        self.load = self.add(self.load, (routing.load.detach().float().reshape(-1, probs.shape[-1]) * flat_real).sum(0))
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        self.entropy = self.add(self.entropy, (entropy * real).sum())
        self.tokens = self.add(self.tokens, real.sum())
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
        load = self.load / self.load.sum().clamp_min(1e-12)
        cv = (load.std(unbiased=False) / load.mean()).item() if load.numel() > 1 else 0.0
        drop_rate = 0.0 if self.dropped is None else (self.dropped / self.requested.clamp_min(1)).item()
        by_position = [] if self.dropped_at is None else (self.dropped_at / self.requested_at.clamp_min(1)).tolist()
        return LayerStats(
            load=load.tolist(),
            load_cv=cv,
            entropy=(self.entropy / self.tokens.clamp_min(1)).item(),
            drop_rate=drop_rate,
            drop_rate_by_position=by_position,
            tokens=int(self.tokens.item()),
        )


class RoutingStats:
    """Context manager: hooks every router of ``adapter_name`` while open."""

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        from ..layer import MoPELayer

        self.accumulators: dict[str, Accumulator] = {}
        self.handles = []
        for name, layer in model.named_modules():
            if isinstance(layer, MoPELayer) and adapter_name in layer.mope_router:
                self.accumulators[name] = Accumulator()
                hook = self.hook_for(self.accumulators[name])
                self.handles.append(layer.mope_router[adapter_name].register_forward_hook(hook))

    @staticmethod
    def hook_for(accumulator: Accumulator):
        def hook(module: nn.Module, args: tuple, output: Routing) -> None:
            inputs = args[1] if len(args) > 1 and isinstance(args[1], RoutingInputs) else None
            accumulator.update(output, None if inputs is None else inputs.token_mask)

        return hook

    def __enter__(self) -> RoutingStats:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def report(self) -> dict[str, dict]:
        """Per module: the statistics as plain Python values (one device-to-host copy per number)."""
        return {name: asdict(acc.result()) for name, acc in self.accumulators.items() if acc.load is not None}


def routing_stats(model: nn.Module, adapter_name: str = "default") -> RoutingStats:
    """Start collecting routing statistics on ``model``; use as a context manager."""
    return RoutingStats(model, adapter_name)
