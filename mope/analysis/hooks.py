"""Router forward hooks shared by every routing analysis: one collector per router, opened and closed together.

A collector is any object with ``update(routing, inputs)``; the hook hands it the router's
output and the :class:`~mope.routing.RoutingInputs` it was called with (mask, token ids). The
collectors keep what they need on the device; the analyses read them to the host once, at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import torch
from torch import nn

from ..routing import Router, Routing, RoutingInputs


class Collector(Protocol):
    def update(self, routing: Routing, inputs: RoutingInputs) -> None: ...


C = TypeVar("C", bound=Collector)


def token_mask(routing: Routing, inputs: RoutingInputs) -> torch.Tensor:
    """Float ``[*token_dims]`` mask of the tokens that count (1 = real); all ones when no mask fits."""
    shape = routing.probs.shape[:-1]
    mask = inputs.token_mask
    if mask is None or tuple(mask.shape) != tuple(shape):
        return torch.ones(shape, device=routing.probs.device)
    return mask.to(routing.probs.device).float()


def finite_tokens(routing: Routing) -> torch.Tensor:
    """Bool ``[*token_dims]``: the tokens whose gate weights and probabilities are all finite.

    A router with NaN weights (or fed NaN states) still yields plausible numbers downstream:
    argmax and top-k of a NaN row pick fixed experts, so a hard gate's load, drop rate and
    choices look healthy. Every analysis counts the other tokens and reports NaN when any are real.
    """
    return torch.isfinite(routing.probs).all(-1) & torch.isfinite(routing.weights).all(-1)


def feed(collector: Collector, module: nn.Module, args: tuple, output: Routing) -> None:
    """Hand a router call's routing and inputs to ``collector``."""
    given = args[1] if len(args) > 1 and isinstance(args[1], RoutingInputs) else None
    collector.update(output, given or RoutingInputs())


class RouterHooks(Generic[C]):
    """Context manager: hooks every router of ``adapter_name``; ``collectors`` maps module name to collector.

    ``make(router)`` builds each router's collector. Block-level routing calls only the block
    leader's router, so followers get no collector.
    """

    def __init__(self, model: nn.Module, make: Callable[[Router], C], adapter_name: str = "default") -> None:
        from ..layer import MoPELayer

        self.collectors: dict[str, C] = {}
        self.handles = []
        for name, layer in model.named_modules():
            if isinstance(layer, MoPELayer) and adapter_name in layer.mope_router:
                router = layer.mope_router[adapter_name]
                self.collectors[name] = make(router)
                self.handles.append(router.register_forward_hook(self.hook_for(self.collectors[name])))

    @staticmethod
    def hook_for(collector: Collector):
        """The router's forward hook feeding ``collector``: a partial, not a closure, so a model under the hooks
        still pickles (``torch.save`` of the model from a Trainer callback)."""
        return functools.partial(feed, collector)

    def __enter__(self) -> RouterHooks[C]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
