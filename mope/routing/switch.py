"""Switch Transformer gate (Fedus et al. 2021): top-1 with expert capacity."""

from __future__ import annotations

from .top_k import TopKRouter

# Switch's usual training setting (Fedus et al. 2021, Table 1); used when capacity_factor is None.
SWITCH_CAPACITY_FACTOR = 1.25


class SwitchRouter(TopKRouter):
    """``g_i = p_i`` for ``i = argmax p``, ``p = softmax(W x)``, then capacity ``ceil(f * T / N)``.

    The weight is the unrenormalised probability (a renormalised top-1 weight would always be 1
    and leave the router without a task-loss gradient). ``top_k`` and ``top_k_order`` are ignored;
    ``capacity_factor=None`` means Switch's 1.25, ``router_jitter`` is Switch's input noise.
    """

    schedules_top_k = False  # top-1 is what makes it Switch; a dense-to-sparse schedule may not widen it

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, 1, config)
        self.order = "softmax_then_topk_unnormalised"
        if self.capacity_factor is None:
            self.capacity_factor = SWITCH_CAPACITY_FACTOR
