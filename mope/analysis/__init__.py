"""Routing statistics, collected only when asked."""

from .load import expert_load
from .stats import LayerStats, RoutingStats, routing_stats

__all__ = ["LayerStats", "RoutingStats", "expert_load", "routing_stats"]
