"""The ``Routing`` value and the ``Router`` base class every gate strategy derives from."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .levels import ROUTING_LEVELS


@dataclass(frozen=True)
class Deferred:
    """A Routing field not computed yet: ``fn(*tensors, *settings)``, run on first read.

    ``fn`` works on any leading dims, so :func:`stack_field` can run it once on the inputs of
    several layers stacked together, instead of once per layer.
    """

    fn: Callable[..., torch.Tensor]
    tensors: tuple[torch.Tensor, ...]
    settings: tuple = ()

    def __call__(self) -> torch.Tensor:
        return self.fn(*self.tensors, *self.settings)


class Deferrable:
    """A Routing field a gate may give as a :class:`Deferred`, computed once, on first read.

    What only losses and statistics read (the full softmax, the dispatch shares) then costs
    nothing in a forward that does not read it, e.g. each step of KV-cached decoding.
    """

    def __init__(self, name: str) -> None:
        self.slot = "_deferred_" + name

    def __get__(self, routing: Any, owner: type | None = None) -> Any:
        if routing is None:  # read on the class (torch.compile's guards do): the descriptor itself
            return self
        value = routing.__dict__[self.slot]
        if isinstance(value, Deferred):
            value = routing.__dict__[self.slot] = value()
        return value

    def __set__(self, routing: Any, value: torch.Tensor | Deferred) -> None:
        routing.__dict__[self.slot] = value

    def pending(self, routing: Any) -> Deferred | None:
        """The field's Deferred if it has not been computed yet, else None."""
        value = routing.__dict__[self.slot]
        return value if isinstance(value, Deferred) else None


@dataclass
class Routing:
    """What a gate decided for a batch of tokens (all tensors fp32, leading dims = token dims).

    ``weights``: ``[..., N]`` gate weight per expert, zero for experts a token does not use; this
    is all the dispatch needs. ``probs`` and ``logits``: the router's full softmax and raw scores
    (for losses and statistics). ``load``: each token's share of dispatch per expert, summing
    to 1 over experts (one-hot / k for top-k, the probabilities for a dense gate; expert choice, where a
    token may get no expert or several: its dispatch counts scaled to sum to 1 per token on average); the
    load-balancing loss reads it. ``probs`` and ``load`` may be given as a :class:`Deferred`,
    computed on first read.
    ``dropped``: bool ``[..., N]``, True where the gate chose the
    expert but capacity overflow removed the assignment (its weight is then 0), or None for gates
    without capacity; :func:`mope.routing.capacity.drop_rate_by_position` reads it.
    ``selectors``: ``[..., S, N]`` distributions whose entropy the entropy regulariser penalises
    (DSelect-k's S single-expert selectors), or None, meaning ``probs`` is the one selector.
    ``chosen``: ``[..., k]`` long, the experts a token's weights may be nonzero at (k distinct
    indices; a choice capacity dropped or a top-p cut may still be listed, at weight 0), given by
    gates that pick a fixed number of experts, or None. The dispatch strategies that compute
    only the chosen experts read it instead of finding the nonzeros (a host sync on a GPU).
    """

    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    load: torch.Tensor
    dropped: torch.Tensor | None = None
    selectors: torch.Tensor | None = None
    chosen: torch.Tensor | None = None


# Set after @dataclass has written __init__ (which assigns them through the descriptors): a class
# attribute present while the decorator runs would be taken for the field's default.
Routing.probs = Deferrable("probs")
Routing.load = Deferrable("load")


def stack_field(routings: list[Routing], name: str, stacked: dict | None = None) -> torch.Tensor:
    """``[L, T, N]``: field ``name`` of L routings with the same token shape, tokens flattened.

    Where every layer still defers the field to the same function and settings, it runs once on
    the layers' inputs stacked: one kernel for all layers (the router losses of a whole model).
    ``stacked``: what one computation stacked before (:func:`stack_tokens`).
    """
    field = vars(Routing).get(name)
    pending = [field.pending(r) for r in routings] if isinstance(field, Deferrable) else [None]
    first = pending[0]
    if first is not None and all(p is not None and (p.fn, p.settings) == (first.fn, first.settings) for p in pending):
        per_input = zip(*(p.tensors for p in pending), strict=True)  # each input's tensors across layers
        return first.fn(*(stack_tokens(tensors, stacked) for tensors in per_input), *first.settings)
    return stack_tokens([getattr(r, name) for r in routings], stacked)


def stack_tokens(tensors, stacked: dict | None = None) -> torch.Tensor:
    """``[L, T, D]`` from L tensors of one shape ``[..., D]``: stacked, then one view (not one per layer).

    ``stacked`` (a dict that lives for one computation, e.g. the router losses of one forward): the same L
    tensors are stacked once. The losses read each layer's logits three times (the softmax, the load's shape,
    the z-loss); stacked once, each layer's logits also get one gradient, not two to add.
    """
    tensors = list(tensors)
    key = tuple(map(id, tensors)) if stacked is not None else None  # (no id() in a compiled graph: a guard each)
    if key is not None and key in stacked:
        return stacked[key]
    result = torch.stack(tensors)
    result = result.reshape(result.shape[0], -1, result.shape[-1])
    if key is not None:
        stacked[key] = result
    return result


def softmax_last(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def one_hot_shares_of(like: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(like).scatter(-1, index, 1.0 / k)


def full_softmax(logits: torch.Tensor) -> Deferred:
    """The softmax over all experts, deferred: only losses and statistics read it."""
    return Deferred(softmax_last, (logits,))


def one_hot_shares(like: torch.Tensor, index: torch.Tensor, k: int) -> Deferred:
    """Like ``like [..., N]``: 1/k at the k experts ``index [..., k]`` chose, 0 elsewhere; deferred.

    A top-k gate's ``load``: only losses and statistics read it.
    """
    return Deferred(one_hot_shares_of, (like, index), (k,))


@dataclass
class RoutingInputs:
    """What a router may look at besides the hidden states (all optional).

    ``token_mask``: 1 for real tokens, 0 for padding, shaped like the hidden states' token dims
    (``[batch, seq]``), or None when unknown. Gates that look across tokens (capacity,
    expert choice, sequence pooling) must ignore padding through it.
    ``token_ids``: ``[batch, seq]`` token ids aligned with the layer's tokens (hash routing), or None.
    ``task_ids`` / ``group_ids``: ``[batch]`` per-example labels given as ``model(..., mope_task_ids=...)``
    (task-level routing) and ``group_ids=...`` (LoRAMoE's localized balancing), or None.
    ``cache_step``: True when the layer sees only the newest tokens of a longer, KV-cached sequence.
    ``decisions``: the model's :class:`~mope.routing.levels.DecisionCache` (sequence-level routing
    keeps the prompt's decision there for later tokens), or None.
    ``captured``: every input the call captured, by routing key (``CAPTURED_INPUTS`` in
    :mod:`mope.routing.context`): a new forward input a gate reads arrives here as it was passed.
    """

    token_mask: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    cache_step: bool = False
    decisions: Any = None
    captured: Mapping[str, torch.Tensor] = field(default_factory=dict)


def init_router_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.normal_(weight, mean=0.0, std=std)


def init_router_zeros(weight: torch.Tensor, std: float) -> None:
    nn.init.zeros_(weight)


def init_router_kaiming(weight: torch.Tensor, std: float) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


ROUTER_INITS: dict[str, Callable[[torch.Tensor, float], None]] = {
    "normal": init_router_normal,
    "zeros": init_router_zeros,
    "kaiming": init_router_kaiming,
}


class Router(nn.Module):
    """A linear scoring layer plus a gate rule; subclasses implement :meth:`gate`.

    Scores are computed in fp32 whatever the model's dtype or autocast state: softmax and
    top-k on bf16 logits flip expert choices between otherwise equal runs.
    """

    # Whether the gate reads MoPEConfig.capacity_factor (the config refuses it for gates that would ignore it).
    accepts_capacity: bool = False
    # whether the gate adds Shazeer's trainable noise to its logits in training (MoPEConfig.router_noise)
    takes_noise: bool = False
    # Whether top_k is a free choice the dense-to-sparse schedule may anneal (not for structural k: hash, DSelect-k).
    schedules_top_k: bool = True
    # Whether a token's weights have at most top_k nonzeros (sorted dispatch pays); False: dense-ish (masked).
    sparse_weights: bool = True
    # Whether the scoring weight trains: a Parameter initialised by init_weight (True), or a buffer that starts
    # at zero and that the gate's own procedure fills (False: Arrow's prototypes, mope.routing.arrow.init_arrow).
    weight_trains: bool = True

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = config.router_jitter
        # The scoring weight [rows, in_features], saved in bundles as "<module>.mope_router.weight": its
        # shape comes from the gate (weight_rows), so no gate replaces or deletes it afterwards.
        rows = self.weight_rows(num_experts, top_k, config)
        if rows is not None and self.weight_trains:
            self.weight = nn.Parameter(torch.empty(rows, in_features))
            self.init_weight(self.weight.data, config)
        elif rows is not None:
            self.register_buffer("weight", torch.zeros(rows, in_features))
        # Expert groups (hierarchical gate, LoRAMoE's localized balancing): experts split evenly, in order.
        self.num_groups, self.group_delta = config.num_groups, config.localized_balance_delta
        # What the router looks at (token state, pooled sequence, task id): mope.routing.levels.
        self.level = ROUTING_LEVELS[config.routing_level]
        # Dense-to-sparse schedule (mope.routing.schedule): start values at progress 0, configured ones at 1.
        self.final_top_k, self.start_top_k = top_k, config.router_schedule_start_top_k
        self.final_temperature = self.temperature = config.router_temperature
        self.start_temperature = config.router_schedule_start_temperature
        self.set_schedule_progress(0.0 if config.router_schedule_steps else 1.0)
        # routing_level='task': the task that mope.fix_task pinned (used when a forward gives no task_ids,
        # and what makes the weights input-independent, hence mergeable); a runtime setting, not saved.
        self.fixed_task: int | None = None

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> int | None:
        """Rows of the scoring weight that :meth:`score` multiplies the input by; None: the gate has none.

        One logit per routed expert by default. A gate that scores differently gives its own count
        (hierarchical: groups + experts; DSelect-k: selector bits + mixture logits; cosine: the
        routing space; Soft MoE: slots), or None when it reads no hidden state (hash).
        """
        return num_experts

    def init_weight(self, weight: torch.Tensor, config: Any) -> None:
        """Initialise a trained scoring weight in place: ``MoPEConfig.router_init`` (DSelect-k adds its own)."""
        ROUTER_INITS[config.router_init](weight, config.router_init_std)

    @classmethod
    def check_options(cls, config: Any) -> None:
        """Raise ValueError naming the field if a ``MoPEConfig`` field this gate owns has a bad value.

        Called for every registered gate whichever ``router`` is chosen, so a bad value is refused
        even while another gate is in use (the field is saved and may be read later). Validate with
        :mod:`mope.checks`. Options several gates share live in :mod:`mope.routing.options`.
        """

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        """Raise ValueError if this gate cannot run with the rest of ``config`` (called when ``router`` names it).

        Cross-field constraints: e.g. hash routing needs ``routing_level='token'``, Soft MoE an
        encoder task type. What depends on the model is :meth:`check_module`'s, at injection.
        """

    def forward(self, x: torch.Tensor, inputs: RoutingInputs | None = None) -> Routing:
        inputs = inputs or RoutingInputs()
        if torch.is_autocast_enabled(x.device.type):  # the context only when needed: it costs a few us per call
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.level.route(self, x.float(), inputs)
        return self.level.route(self, x.float(), inputs)

    def decide(self, x: torch.Tensor, inputs: RoutingInputs) -> Routing:
        """Score and gate fp32 router inputs (token states, pooled states or task one-hots, per level)."""
        logits = self.score(x)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return self.gate(logits, inputs)

    def set_schedule_progress(self, progress: float) -> None:
        """Interpolate top_k and the temperature linearly from their start values (0) to the configured ones (1)."""
        if self.schedules_top_k and self.start_top_k is not None:
            start = min(self.start_top_k, self.num_experts)
            self.top_k = math.floor(start + (self.final_top_k - start) * progress + 0.5)
        if self.start_temperature is not None:
            self.temperature = self.start_temperature + (self.final_temperature - self.start_temperature) * progress

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[..., N]`` from fp32 hidden states (jitter applied in training)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return nn.functional.linear(x, self.weight.float())

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        """Turn fp32 logits into a Routing; what distinguishes one gate from another."""
        raise NotImplementedError

    # Gates that apply the experts themselves (soft_merge merges their parameters, soft_tokens mixes tokens
    # into slots) set this and override apply_experts; the layer otherwise calls the bank's mixture of outputs.
    applies_experts: bool = False

    def apply_experts(
        self, bank: nn.Module, x: torch.Tensor, base_out: torch.Tensor, routing: Routing, weights: torch.Tensor
    ) -> torch.Tensor:
        """The module's output from its input ``x``, the base output and this forward's routing."""
        return bank(x, base_out, weights)

    def merged_lora(self, bank: nn.Module, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp64 ``(A [R, d_in], B [d_out, R])`` of the update this gate's forward applies with the constant gate
        weights ``[N]``, where that is not the experts' mixture (the bank's ``lora_factors`` / ``fold_into``);
        None where it is. Folding (merge, collapse) asks this first, so it follows ``apply_experts``."""
        return None

    @classmethod
    def check_module(cls, model: nn.Module, module_name: str, config: Any) -> None:
        """Raise ValueError at injection if this gate cannot run on ``module_name`` of ``model``."""

    def weights_need_the_batch(self) -> bool:
        """Whether an inference forward's weights (or expert inputs) for a token depend on the batch's other
        tokens: capacity that may drop it, expert choice, Soft MoE's slots. No weight update folded into the
        base reproduces such a gate, even with one expert or one pinned task."""
        return False

    def fixed_weights(self) -> torch.Tensor | None:
        """Gate weights if they do not depend on the input (then the mixture can be merged), else None."""
        if self.weights_need_the_batch():
            return None
        weight = getattr(self, "weight", None)  # gates that score without a weight have none
        if self.num_experts == 1:
            return torch.ones(1, device=None if weight is None else weight.device)
        if self.fixed_task is not None:  # task-level routing pinned to one task: the gate of its one-hot column
            was_training = self.training
            self.eval()  # no noise or jitter: the weights an inference forward with that task uses
            try:
                with torch.no_grad():
                    routing = self.level.route(self, self.weight.new_zeros(1, 1, 1).float(), RoutingInputs())
            finally:
                self.train(was_training)
            return routing.weights.reshape(-1, self.num_experts)[0]
        return None

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, in_features={self.in_features}"
