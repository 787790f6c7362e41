"""Token-choice top-k gate (Shazeer 2017, GShard, Mixtral), with optional noise and expert capacity."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import check_bool, check_choice
from ..kernels import ROUTER_KERNEL_MAX_EXPERTS, triton_unavailable
from .base import Deferred, Router, Routing, RoutingInputs, full_softmax, one_hot_shares
from .capacity import apply_capacity, may_drop
from .expert_choice import CAUSAL_TASK_TYPES

# (logits [..., N], k) -> (probs [..., N] or a Deferred, gate weights [..., N] (0 outside the chosen),
#                          chosen experts [..., k])
TopKOrder = Callable[[torch.Tensor, int], tuple[torch.Tensor | Deferred, torch.Tensor, torch.Tensor]]


def softmax_then_topk(logits: torch.Tensor, k: int) -> tuple[Deferred, torch.Tensor, torch.Tensor]:
    """GShard / Mixtral: softmax over all N, keep the k largest, renormalise them to sum 1.

    That is ``exp(l_i)`` over the sum of the kept ``exp(l_j)`` (see ``topk_then_softmax``), computed
    with the fewest kernels for the case at hand. Without autograd: a softmax over the k largest
    logits, scattered into zeros. With it: a softmax over the logits with all but the k largest set
    to -inf, one forward op more and three backward ops fewer (no gather, and no scatter into
    zeros for top-k's backward). The same value and gradient; exactly k experts kept even when
    logits tie. The full softmax, which only losses and statistics read, is deferred
    (:class:`~mope.routing.base.Deferred`).
    """
    if not (logits.requires_grad and torch.is_grad_enabled()):
        top, index = torch.topk(logits, k, dim=-1)
        return full_softmax(logits), torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1)), index
    index = torch.topk(logits.detach(), k, dim=-1).indices
    keep = torch.full_like(logits, -math.inf).scatter(-1, index, 0.0)
    return full_softmax(logits), torch.softmax(logits + keep, dim=-1), index


def topk_then_softmax(logits: torch.Tensor, k: int) -> tuple[Deferred, torch.Tensor, torch.Tensor]:
    """Shazeer et al. 2017: KeepTopK on the logits, then softmax over the k kept ones.

    Equal in value and gradient to ``softmax_then_topk`` (both are exp(l_i) / sum over the
    kept exp(l_j)), which computes it this way too; kept as its own option because it is the
    paper's formulation, and with noisy logits it names what is computed.
    """
    return softmax_then_topk(logits, k)


def softmax_then_topk_unnormalised(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Switch / DeepSeek / Qwen-MoE (``norm_topk_prob=False``): the k largest probabilities, as they are.

    The only order whose weights differ from the other two; with k = 1 it is the one that still
    gives the router a gradient from the task loss (a renormalised top-1 weight is always 1).
    """
    probs = torch.softmax(logits, dim=-1)
    values, index = torch.topk(probs, k, dim=-1)
    return probs, torch.zeros_like(probs).scatter(-1, index, values), index


TOP_K_ORDERS: dict[str, TopKOrder] = {
    "softmax_then_topk": softmax_then_topk,
    "topk_then_softmax": topk_then_softmax,
    "softmax_then_topk_unnormalised": softmax_then_topk_unnormalised,
}
# The orders the Triton router kernel (mope.kernels.router) computes, and whether it renormalises the kept weights
KERNEL_ORDERS: dict[str, bool] = {
    "softmax_then_topk": True,
    "topk_then_softmax": True,
    "softmax_then_topk_unnormalised": False,
}


class TopKRouter(Router):
    """``g = top_k(W x)`` weighted by ``top_k_order``; unselected experts get weight exactly 0.

    Gradients reach the router through the selected weights only (Mixtral's convention).
    Options: ``router_noise`` (Shazeer's trainable noise, training only), ``capacity_factor`` /
    ``capacity_policy`` (see :mod:`mope.routing.capacity`; in a causal model, training only).
    """

    accepts_capacity = True
    takes_noise = True

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.order = config.top_k_order
        self.capacity_factor: float | None = config.capacity_factor
        self.capacity_policy: str = config.capacity_policy
        self.causal = config.task_type in CAUSAL_TASK_TYPES
        # Shazeer 2017 start W_noise at zero: noise std softplus(0) = ln 2 while the router learns.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, in_features)) if config.router_noise else None
        # the layer's dispatch (mope.dispatch; mope.set_dispatch changes both): 'triton' scores and gates in a kernel
        self.dispatch: str = getattr(config, "dispatch", "auto")

    @classmethod
    def check_options(cls, config: Any) -> None:
        """``top_k_order`` and ``router_noise`` (capacity is shared: :func:`~mope.routing.capacity.check_capacity_options`)."""
        check_choice("MoPEConfig", "top_k_order", config.top_k_order, TOP_K_ORDERS)
        check_bool("MoPEConfig", "router_noise", config.router_noise)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Noisy top-k: ``W x + N(0, 1) * softplus(W_noise x)`` in training; plain ``W x`` otherwise."""
        logits = super().score(x)
        if self.noise_weight is not None and self.training:
            std = F.softplus(F.linear(x, self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * std
        return logits

    def decide(self, x: torch.Tensor, inputs: RoutingInputs) -> Routing:
        """With ``dispatch='triton'``, score and gate in the Triton router kernel where it applies.

        It computes plain linear scores (not a subclass's own ``score``, not the noise or jitter of
        training, drawn in torch) over at most ``ROUTER_KERNEL_MAX_EXPERTS`` experts, on a device where
        the kernels run; anywhere else the torch path,
        and a LoRA bank set to ``'triton'`` then refuses the device itself, naming why.
        """
        if not self.kernel_applies(x):
            return super().decide(x, inputs)
        from ..kernels.router import route_top_k  # imports Triton: only once the kernel is used

        normalise = KERNEL_ORDERS[self.order]
        logits, weights, index = route_top_k(x, self.weight, self.top_k, self.temperature, normalise)
        return self.routing(logits, full_softmax(logits), weights, index, inputs)

    def kernel_applies(self, x: torch.Tensor) -> bool:
        if self.dispatch != "triton" or self.order not in KERNEL_ORDERS or type(self).score is not TopKRouter.score:
            return False
        if self.training and (self.noise_weight is not None or self.jitter > 0):
            return False
        if self.num_experts > ROUTER_KERNEL_MAX_EXPERTS:  # its tiles would outgrow a GPU block's shared memory
            return False
        return x.shape[:-1].numel() > 0 and triton_unavailable(x.device) is None

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        probs, weights, index = TOP_K_ORDERS[self.order](logits, self.top_k)
        return self.routing(logits, probs, weights, index, inputs)

    def routing(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor | Deferred,
        weights: torch.Tensor,
        index: torch.Tensor,
        inputs: RoutingInputs,
    ) -> Routing:
        """The Routing of the chosen experts ``index`` and their ``weights``: the deferred load, then capacity."""
        # load: the gate's choice before capacity (GShard/fairseq count it so for the balancing loss);
        # deferred like the full softmax: only losses and statistics read it
        load = one_hot_shares(logits, index, self.top_k)
        dropped = None
        if self.capacity_factor is not None and not self.capacity_applies(inputs):
            dropped = torch.zeros_like(logits, dtype=torch.bool)  # capacity configured, nothing dropped
        elif self.capacity_factor is not None:
            probs = probs() if isinstance(probs, Deferred) else probs
            values = weights.gather(-1, index)
            kept, dropped_slots = apply_capacity(
                index,
                values,
                probs.max(dim=-1).values,
                inputs.token_mask,
                self.capacity_factor,
                self.capacity_policy,
                self.num_experts,
                self.training,
            )
            weights = weights.scatter(-1, index, values * kept)
            dropped = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, index, dropped_slots)
        return Routing(weights=weights, probs=probs, logits=logits, load=load, dropped=dropped, chosen=index)

    def capacity_applies(self, inputs: RoutingInputs) -> bool:
        """Whether capacity may drop assignments in this forward: always in training, in eval only if not causal
        and not inside ``generate`` (a model with no ``task_type`` generates too).

        Capacity counts the batch's tokens, later ones included, so in a causal model's eval it
        would leak the future and make KV-cached decoding (each step's few tokens compete) differ
        from uncached decoding (the whole sequence competes). Switch and GShard also set an eval
        capacity; a causal model here drops nothing outside training, as Mixtral- and DeepSeek-style
        inference does, so a token's output depends on it and earlier tokens only.
        """
        generating = inputs.decisions is not None and inputs.decisions.pinned
        return self.training or not (self.causal or generating)

    def weights_need_the_batch(self) -> bool:
        """Inference capacity (non-causal models) that may drop a token's expert: ``capacity_factor * k < N``."""
        factor = self.capacity_factor
        return factor is not None and not self.causal and may_drop(factor, self.top_k, self.num_experts)

    def extra_repr(self) -> str:
        extra = f", order={self.order}, noise={self.noise_weight is not None}"
        if self.capacity_factor is not None:
            extra += f", capacity_factor={self.capacity_factor}, capacity_policy={self.capacity_policy}"
        return super().extra_repr() + extra
