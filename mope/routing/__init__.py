"""Gate strategies. Add a gate: write a ``Router`` subclass in its own file, add one line here."""

from __future__ import annotations

from .base import ROUTER_INITS, Router, Routing, RoutingInputs
from .dense import DenseRouter
from .top_k import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "top_k": TopKRouter,
    "dense": DenseRouter,
}

__all__ = ["ROUTERS", "ROUTER_INITS", "DenseRouter", "Router", "Routing", "RoutingInputs", "TopKRouter"]
