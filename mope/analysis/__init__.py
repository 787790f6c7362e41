"""Routing analyses (statistics, OpenMoE's specialisation and stability) and plots, collected only when asked."""

from .choices import record_choices, token_choices
from .load import expert_load
from .report import routing_report
from .separation import load_separation, module_separation
from .specialization import token_specialization
from .stability import routing_agreement
from .stats import LayerStats, RoutingStats, routing_stats

__all__ = [
    "LayerStats",
    "RoutingStats",
    "expert_load",
    "load_separation",
    "module_separation",
    "record_choices",
    "routing_agreement",
    "routing_report",
    "routing_stats",
    "token_choices",
    "token_specialization",
]
