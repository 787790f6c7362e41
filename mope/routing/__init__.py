"""Gate strategies. Add a gate: write a ``Router`` subclass in its own file, add one line here."""

from __future__ import annotations

from .arrow import ArrowRouter
from .balanced import BalancedRouter
from .base import ROUTER_INITS, Router, Routing, RoutingInputs
from .capacity import CAPACITY_POLICIES, drop_rate_by_position
from .cosine import CosineRouter
from .dense import DenseRouter
from .dselect_k import DSelectKRouter
from .expert_choice import ExpertChoiceRouter, NoncausalRoutingError
from .hash import HashRouter
from .hierarchical import HierarchicalRouter
from .soft_merge import SoftMergeRouter
from .soft_tokens import SoftTokensRouter
from .switch import SwitchRouter
from .top_k import TOP_K_ORDERS, TopKRouter
from .top_p import TopPRouter

ROUTERS: dict[str, type[Router]] = {
    "top_k": TopKRouter,
    "dense": DenseRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "balanced": BalancedRouter,
    "top_p": TopPRouter,
    "hierarchical": HierarchicalRouter,
    "dselect_k": DSelectKRouter,
    "cosine": CosineRouter,
    "hash": HashRouter,
    "soft_merge": SoftMergeRouter,
    "soft_tokens": SoftTokensRouter,
    "arrow": ArrowRouter,
}

__all__ = [
    "CAPACITY_POLICIES",
    "ROUTERS",
    "ROUTER_INITS",
    "TOP_K_ORDERS",
    "ArrowRouter",
    "BalancedRouter",
    "DenseRouter",
    "ExpertChoiceRouter",
    "NoncausalRoutingError",
    "Router",
    "Routing",
    "RoutingInputs",
    "SwitchRouter",
    "TopKRouter",
    "drop_rate_by_position",
]
