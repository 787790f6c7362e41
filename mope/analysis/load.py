"""Expert load per layer: the share of (non-padding) dispatch each expert receives.

Collected with forward hooks on the routers, on device, only while a meter is attached.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..layer import MoPELayer
from ..routing import Routing, RoutingInputs


class ExpertLoadMeter:
    """Attach to a model, run forwards, read ``shares()``; ``close()`` removes the hooks."""

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, layer in model.named_modules():
            if isinstance(layer, MoPELayer) and adapter_name in layer.mope_router:
                router = layer.mope_router[adapter_name]
                self.handles.append(router.register_forward_hook(self.hook_for(name)))

    def hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Routing) -> None:
            inputs = args[1] if len(args) > 1 and isinstance(args[1], RoutingInputs) else None
            load = output.load.detach().reshape(-1, output.load.shape[-1]).float()
            if inputs is not None and inputs.token_mask is not None:
                load = load * inputs.token_mask.reshape(-1, 1).to(load.device, load.dtype)
            total = load.sum(dim=0)
            self.totals[name] = total if name not in self.totals else self.totals[name] + total

        return hook

    def shares(self) -> dict[str, list[float]]:
        return {name: (t / t.sum().clamp_min(1e-12)).tolist() for name, t in self.totals.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def coefficient_of_variation(shares: list[float]) -> float:
    t = torch.tensor(shares)
    return (t.std(unbiased=False) / t.mean()).item() if t.numel() > 1 else 0.0


@torch.no_grad()
def expert_load(model: nn.Module, batches: Iterable[dict], adapter_name: str = "default") -> dict[str, dict]:
    """Per adapted module: expert shares of dispatch and their coefficient of variation."""
    meter = ExpertLoadMeter(model, adapter_name)
    try:
        for batch in batches:
            model(**batch)
    finally:
        meter.close()
    return {name: {"share": s, "cv": coefficient_of_variation(s)} for name, s in meter.shares().items()}
