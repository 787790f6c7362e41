"""Expert-choice gate (Zhou et al. 2022): each expert picks its top-c tokens of the batch.

Perfectly balanced by construction and needs no balancing loss, but a token's routing depends on
every other token of the batch, later ones included. In a causal model that leaks the future:
training sees routing that decoding can never reproduce, and an eval-mode score of a sequence
uses its own continuation. So in a causal model (task_type CAUSAL_LM or SEQ_2_SEQ_LM, whose
decoder is causal) the gate refuses to run outside training, and in any model it refuses a
KV-cache step (the layer sees only the newest tokens of a longer sequence: generation), unless
``MoPEConfig.allow_noncausal_routing=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_bool
from .base import Router, Routing, RoutingInputs
from .capacity import expert_capacity, may_drop

CAUSAL_TASK_TYPES = frozenset({"CAUSAL_LM", "SEQ_2_SEQ_LM"})


class NoncausalRoutingError(RuntimeError):
    """A gate that looks at later tokens was asked to run where that would leak them (generation, eval)."""


class ExpertChoiceRouter(Router):
    """``c = ceil(f * T / N)``; expert e takes the c real tokens with the highest ``p_e = softmax(W x)_e``.

    ``g[t, e] = p_e(t)`` if expert e chose token t, else 0 (a token may get 0..N experts).
    ``capacity_factor=None`` means ``f = top_k``: the same expert compute as token-choice top-k
    (Zhou et al.'s EC-CF2 for k = 2), and the dense-to-sparse schedule anneals it with top_k. Padding is never chosen and does not count in T. Ties go
    to the earlier token (flattened batch order).
    """

    accepts_capacity = True

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.fixed_factor: float | None = config.capacity_factor  # None: f follows top_k (and its schedule)
        self.causal = config.task_type in CAUSAL_TASK_TYPES
        self.allow_noncausal = config.allow_noncausal_routing
        self.task_type = config.task_type

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_bool("MoPEConfig", "allow_noncausal_routing", config.allow_noncausal_routing)

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        if config.capacity_factor is not None and config.router_schedule_start_top_k is not None:
            raise ValueError(
                "MoPEConfig.router_schedule_start_top_k: router='expert_choice' anneals its capacity factor f = top_k "
                f"only when capacity_factor is None; capacity_factor={config.capacity_factor} fixes f"
            )

    @property
    def capacity_factor(self) -> float:
        """``f`` in ``c = ceil(f * T / N)``: the configured one, else the current (scheduled) top_k."""
        return float(self.top_k) if self.fixed_factor is None else self.fixed_factor

    def weights_need_the_batch(self) -> bool:
        """Unless every expert takes every token (``capacity_factor >= N``), which tokens it takes depends on the batch."""
        return may_drop(self.capacity_factor, 1, self.num_experts)

    def check_causal_use(self, inputs: RoutingInputs) -> None:
        """Refuse eval-mode use in a causal model, and any KV-cache step, unless explicitly allowed."""
        if self.allow_noncausal or not (inputs.cache_step or (self.causal and not self.training)):
            return
        where = "a KV-cached generation step" if inputs.cache_step else f"task_type={str(self.task_type)!r}"
        raise NoncausalRoutingError(
            f"router='expert_choice' picks tokens across the whole batch and sequence, so in a causal model "
            f"({where}) a token's routing depends on later tokens: generation and "
            "eval-mode scoring would leak the future and cannot match decoding. Refusing to run outside "
            "training. Set MoPEConfig.allow_noncausal_routing=True to run it anyway (e.g. to score full "
            "sequences the way training saw them), or use a token-choice gate such as 'top_k' or 'switch'."
        )

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        self.check_causal_use(inputs)
        probs = torch.softmax(logits, dim=-1)
        n = probs.shape[-1]
        flat = probs.reshape(-1, n)
        if inputs.token_mask is None:
            real = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        else:
            real = inputs.token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
        num_tokens = real.sum()
        capacity = torch.minimum(expert_capacity(self.capacity_factor, num_tokens, 1, n), num_tokens.float())
        # rank of each token in each expert's column (probabilities are >= 0, so padding at -1 ranks last)
        scores = flat.detach().masked_fill(~real.unsqueeze(-1), -1.0).t()  # [N, T]: sort along the last dim
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        ranks = torch.arange(flat.shape[0], device=flat.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, ranks).t()
        chosen = (rank < capacity) & real.unsqueeze(-1)
        weights = (flat * chosen).reshape(probs.shape)
        # dispatch counts scaled to sum to the real token count: the loss's f_i (a mean over tokens) is then expert i's
        # share of all dispatch, whatever share of tokens no expert took (per-token shares left those rows at 0 and
        # scaled the loss down: 0.25 for a perfectly balanced choice, not 1)
        load = (chosen * (num_tokens / chosen.sum().clamp_min(1))).reshape(probs.shape)
        return Routing(weights=weights, probs=probs, logits=logits, load=load)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", capacity_factor={self.capacity_factor}"
