"""Routing statistics, collected only when asked."""

from .load import ExpertLoadMeter, expert_load

__all__ = ["ExpertLoadMeter", "expert_load"]
