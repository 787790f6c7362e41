"""Validation of the routing options every gate shares, whichever gate is chosen.

The router's scoring (``router_init``, ``router_init_std``, ``router_jitter``,
``router_temperature``), the routing level (``routing_level``, ``num_tasks``), the expert groups
(``num_groups``: the hierarchical gate's groups and LoRAMoE's localized balancing loss), the router
losses (``aux_loss_coef``, ``z_loss_coef``, ``importance_loss_coef``, ``entropy_loss_coef``,
``localized_balance_*``), the dense-to-sparse schedule (``router_schedule_*``) and, through
:func:`mope.routing.capacity.check_capacity_options`, expert capacity. A gate's own options are
checked by the gate (:meth:`mope.routing.base.Router.check_options`). Every error is a
``ValueError`` naming the ``MoPEConfig`` field, raised before any model is touched.
"""

from __future__ import annotations

from typing import Any

from ..checks import check_choice, check_int, check_number
from .base import ROUTER_INITS, Router
from .capacity import check_capacity_options
from .levels import ROUTING_LEVELS
from .schedule import SCHEDULE_COUNTERS

OWNER = "MoPEConfig"


def check_shared_options(config: Any, routers: dict[str, type[Router]]) -> None:
    """Validate the options no single gate owns; ``routers`` is the gate table (``config.router`` is in it)."""
    c = config
    routed = c.num_experts - c.num_shared_experts
    check_choice(OWNER, "router_init", c.router_init, ROUTER_INITS)
    check_number(OWNER, "router_init_std", c.router_init_std, low=0)
    check_number(OWNER, "router_jitter", c.router_jitter, low=0, high=1, high_open=True)
    check_number(OWNER, "router_temperature", c.router_temperature, low=0, low_open=True)
    check_choice(OWNER, "routing_level", c.routing_level, ROUTING_LEVELS)
    if c.routing_level == "task":
        check_int(OWNER, "num_tasks", c.num_tasks, low=1, why="with routing_level='task'")
    elif c.num_tasks is not None:
        raise ValueError("MoPEConfig.num_tasks only applies to routing_level='task'; leave it None otherwise")
    check_int(OWNER, "num_groups", c.num_groups, low=1)
    for name in ("aux_loss_coef", "z_loss_coef", "importance_loss_coef", "localized_balance_coef"):
        check_number(OWNER, name, getattr(c, name), low=0)
    check_number(OWNER, "entropy_loss_coef", c.entropy_loss_coef, why="(either sign)")
    check_number(OWNER, "localized_balance_delta", c.localized_balance_delta, low=0, high=1, high_open=True)
    if c.localized_balance_coef and c.num_groups > routed:
        raise ValueError(f"MoPEConfig.num_groups={c.num_groups} exceeds the routed experts ({routed})")
    if c.router_noise is True and not routers[c.router].takes_noise:
        noisy = sorted(name for name, gate in routers.items() if gate.takes_noise)
        raise ValueError(
            f"MoPEConfig.router_noise: router={c.router!r} adds no noise to its logits; gates with noise: {noisy}"
        )
    check_schedule(c, routed, routers)
    check_capacity_options(c, routers)


def check_schedule(c: Any, routed: int, routers: dict[str, type[Router]]) -> None:
    """The dense-to-sparse schedule (``mope.routing.schedule``): its length, start values and counter."""
    steps = check_int(OWNER, "router_schedule_steps", c.router_schedule_steps, low=0)
    start_k = check_int(OWNER, "router_schedule_start_top_k", c.router_schedule_start_top_k, 1, routed, optional=True)
    if start_k is not None and not routers[c.router].schedules_top_k:
        raise ValueError(f"MoPEConfig.router_schedule_start_top_k: router={c.router!r} has a fixed number of experts")
    start_t = check_number(
        OWNER,
        "router_schedule_start_temperature",
        c.router_schedule_start_temperature,
        low=0,
        low_open=True,
        optional=True,
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
    check_choice(OWNER, "router_schedule_counter", c.router_schedule_counter, SCHEDULE_COUNTERS)
