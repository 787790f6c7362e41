"""Validation of the options of the top_p / hierarchical / dselect_k / cosine / hash gates, the
routing level, the importance / entropy / localized-balancing losses and the router schedule.

Kept beside the gates they configure so that ``config.py`` only declares the fields; every
error is a ``ValueError`` naming the ``MoPEConfig`` field, raised before any model is touched.
"""

from __future__ import annotations

import math
from typing import Any

from .arrow import check_arrow_options
from .levels import ROUTING_LEVELS
from .schedule import SCHEDULE_COUNTERS
from .soft_tokens import check_soft_gate_options


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, wanted: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"MoPEConfig.{name} must be {wanted}, got {value!r}")


def check_routing_options(config: Any) -> None:
    from . import ROUTERS  # the table is built after this module is importable

    c = config
    routed = c.num_experts - c.num_shared_experts
    _require(
        _is_number(c.router_temperature) and c.router_temperature > 0,
        "router_temperature",
        "a number > 0",
        c.router_temperature,
    )
    if c.routing_level not in ROUTING_LEVELS:
        raise ValueError(
            f"MoPEConfig.routing_level={c.routing_level!r} is unknown; choose one of {sorted(ROUTING_LEVELS)}"
        )
    if c.routing_level == "task":
        _require(
            _is_int(c.num_tasks) and c.num_tasks >= 1,
            "num_tasks",
            "an integer >= 1 with routing_level='task'",
            c.num_tasks,
        )
    elif c.num_tasks is not None:
        raise ValueError("MoPEConfig.num_tasks only applies to routing_level='task'; leave it None otherwise")
    if c.router == "cosine" and getattr(c, "router_noise", False):
        raise ValueError("MoPEConfig.router_noise is not supported with router='cosine' (its scores are cosines)")
    if c.router == "hash" and c.routing_level != "token":
        raise ValueError("MoPEConfig.routing_level must be 'token' with router='hash': hash routing reads token ids")
    _require(_is_number(c.top_p) and 0 < c.top_p <= 1, "top_p", "a number in (0, 1]", c.top_p)
    _require(_is_int(c.num_groups) and c.num_groups >= 1, "num_groups", "an integer >= 1", c.num_groups)
    if c.router == "hierarchical":
        check_groups(routed, c.num_groups, c.top_k, "MoPEConfig.num_groups")
    if c.localized_balance_coef and c.num_groups > routed:
        raise ValueError(f"MoPEConfig.num_groups={c.num_groups} exceeds the routed experts ({routed})")
    _require(_is_number(c.dselect_gamma) and c.dselect_gamma > 0, "dselect_gamma", "a number > 0", c.dselect_gamma)
    _require(_is_int(c.cosine_dim) and c.cosine_dim >= 1, "cosine_dim", "an integer >= 1", c.cosine_dim)
    _require(
        _is_number(c.cosine_init_temperature) and c.cosine_init_temperature >= 0.01,
        "cosine_init_temperature",
        "a number >= 0.01 (the learned temperature is clamped there)",
        c.cosine_init_temperature,
    )
    _require(_is_int(c.hash_seed) and c.hash_seed >= 0, "hash_seed", "an integer >= 0", c.hash_seed)
    for name in ("importance_loss_coef", "localized_balance_coef"):
        _require(_is_number(getattr(c, name)) and getattr(c, name) >= 0, name, "a number >= 0", getattr(c, name))
    _require(_is_number(c.entropy_loss_coef), "entropy_loss_coef", "a finite number (either sign)", c.entropy_loss_coef)
    delta = c.localized_balance_delta
    _require(_is_number(delta) and 0 <= delta < 1, "localized_balance_delta", "a number in [0, 1)", delta)
    check_schedule(c, routed, ROUTERS)
    check_soft_gate_options(c)
    check_arrow_options(c)


def check_groups(routed: int, num_groups: int, top_k: int, where: str) -> None:
    """Hierarchical routing: groups of equal size, and top_k experts must fit in one group."""
    if routed % num_groups != 0:
        raise ValueError(f"{where}={num_groups} must divide the routed experts ({routed}) into equal groups")
    if top_k > routed // num_groups:
        raise ValueError(
            f"{where}={num_groups} leaves {routed // num_groups} experts per group, fewer than top_k={top_k}: "
            "router='hierarchical' picks top_k experts inside one group"
        )


def check_schedule(c: Any, routed: int, routers: dict) -> None:
    steps, start_k, start_t = (
        c.router_schedule_steps,
        c.router_schedule_start_top_k,
        c.router_schedule_start_temperature,
    )
    _require(_is_int(steps) and steps >= 0, "router_schedule_steps", "an integer >= 0", steps)
    if start_k is not None:
        _require(
            _is_int(start_k) and 1 <= start_k <= routed,
            "router_schedule_start_top_k",
            f"None or an integer in [1, {routed}]",
            start_k,
        )
        if not routers[c.router].schedules_top_k:
            raise ValueError(
                f"MoPEConfig.router_schedule_start_top_k: router={c.router!r} has a fixed number of experts"
            )
    if start_t is not None:
        _require(
            _is_number(start_t) and start_t > 0, "router_schedule_start_temperature", "None or a number > 0", start_t
        )
    if steps and start_k is None and start_t is None:
        raise ValueError(
            "MoPEConfig.router_schedule_steps > 0 needs router_schedule_start_top_k and/or "
            "router_schedule_start_temperature: the values the schedule starts from"
        )
    if not steps and (start_k is not None or start_t is not None):
        raise ValueError(
            "MoPEConfig.router_schedule_start_* is set but router_schedule_steps is 0: the schedule is off"
        )
    if c.router_schedule_counter not in SCHEDULE_COUNTERS:
        raise ValueError(
            f"MoPEConfig.router_schedule_counter={c.router_schedule_counter!r} is unknown; choose one of {SCHEDULE_COUNTERS}"
        )
