"""Auxiliary router losses: one implementation each, all ignoring padding.

Every function takes one layer's :class:`~mope.routing.Routing` and a token mask (1 = real
token, 0 = padding, or None) and returns a scalar; the default losses also have a batched form
over layers (``*_losses``), which the tuner uses after the forward. The tuner averages each loss
over the adapted modules and weights it by its config coefficient:

    aux_loss = sum_name coef_name * mean_over_modules(loss_name)

so a coefficient means the same thing whatever the depth of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .routing import Routing
from .routing.base import stack_field, stack_tokens


def token_weights(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``mask`` flattened and divided by its count (None stays None): a masked mean is then one matvec."""
    if mask is None:
        return None
    weights = mask.reshape(-1).to(dtype)
    return weights / weights.sum().clamp_min(1.0)


def cached_token_weights(mask: torch.Tensor | None, dtype: torch.dtype, cache: dict | None) -> torch.Tensor | None:
    """:func:`token_weights`, once per mask and dtype in ``cache`` (a dict that lives for one forward or one loss
    computation; None: no cache). The mask is kept with its weights, so its ``id`` is not reused meanwhile."""
    if cache is None or mask is None:
        return token_weights(mask, dtype)
    key = ("token_weights", id(mask), dtype)
    kept = cache.get(key)
    if kept is None or kept[0] is not mask:
        kept = cache[key] = (mask, token_weights(mask, dtype))
    return kept[1]


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over all token dims of ``values [..., N]`` (keeping N), with ``token_weights`` (None: plain mean)."""
    flat = values.reshape(-1, values.shape[-1])  # a view for the routers' contiguous outputs
    return flat.mean(dim=0) if weights is None else weights @ flat


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all token dims of ``values [..., N]`` (keeping N), counting only mask == 1."""
    return weighted_mean(values, token_weights(mask, values.dtype))


def load_balancing_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch Transformer / GShard: ``N * sum_i f_i * P_i``.

    ``f_i`` is the share of dispatch that expert i receives (top-k: fraction of token slots;
    sums to 1), ``P_i`` the mean router probability. Equals 1 under perfectly uniform routing,
    up to N when all tokens collapse onto one expert. Only ``P`` carries gradient. The mask is
    normalised once for both means, each one matvec (fewer small kernels per layer on a GPU).
    """
    num_experts = routing.probs.shape[-1]
    weights = token_weights(mask, routing.probs.dtype)
    share = weighted_mean(routing.load.detach(), weights)
    prob = weighted_mean(routing.probs, weights)
    return num_experts * torch.dot(share, prob)


class LossSums:
    """The default router losses' sums over one layer's tokens, which the Triton router kernel computes where the
    layer runs as one kernel call (:mod:`mope.kernels.layer`), so the losses need no op per token: per block of
    ``rows`` tokens, ``sum w p`` (the full softmax, ``[N]``), ``sum w kept / k`` (the load, ``[N]``, a count: it
    takes no gradient) and ``sum w lse^2`` (the z-loss), ``w`` the token weights (:func:`token_weights`; None:
    ``1 / T``). ``stats``: ``[blocks, 2N + 1]``, the kernel's output; the losses sum it over blocks.
    """

    def __init__(self, token_weights: torch.Tensor | None) -> None:
        self.token_weights = token_weights
        self.stats: torch.Tensor | None = None
        self.rows = 0  # tokens per block of stats

    def start(self, x: torch.Tensor, num_experts: int, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The buffer the kernel writes (blocks of ``rows`` tokens of ``x``) and the token weights it reads."""
        self.rows = rows
        self.stats = x.new_empty(-(-x.shape[0] // rows), 2 * num_experts + 1)
        return self.stats, self.token_weights


SUMMED_LOSSES = frozenset({"load_balancing", "z_loss"})  # the losses LossSums serves


def summed(sums: list[LossSums], stacked: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum w p [L, N]``, ``sum w load [L, N]`` and ``sum w lse^2 [L]`` of L layers' :class:`LossSums`."""
    stats = stack_tokens([s.stats for s in sums], stacked)  # [L, blocks, 2N + 1]
    key = ("summed", id(stats)) if stacked is not None else None
    total = stacked.get(key) if key is not None else None
    if total is None:
        total = stats.sum(dim=1)
        if key is not None:
            stacked[key] = total
    n = (total.shape[-1] - 1) // 2
    return total[:, :n], total[:, n : 2 * n], total[:, 2 * n]


def load_balancing_losses(
    routings: list[Routing] | list[LossSums], mask: torch.Tensor | None, stacked: dict | None = None
) -> torch.Tensor:
    """:func:`load_balancing_loss` of each of L layers routing the same tokens, ``[L]``, in a few kernels.

    ``stacked``: what the same computation stacked before (:func:`mope.routing.base.stack_tokens`).
    """
    if isinstance(routings[0], LossSums):
        prob, share, _ = summed(routings, stacked)
        return prob.shape[-1] * (share.detach() * prob).sum(dim=-1)
    probs = stack_field(routings, "probs", stacked)
    weights = cached_token_weights(mask, probs.dtype, stacked)
    load = stack_field(routings, "load", stacked).detach()
    share, prob = (x.mean(dim=1) if weights is None else weights @ x for x in (load, probs))  # [L, N]
    return probs.shape[-1] * (share * prob).sum(dim=-1)


def router_z_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``; keeps logits small."""
    z = torch.logsumexp(routing.logits, dim=-1).square().reshape(-1)
    weights = token_weights(mask, z.dtype)
    return z.mean() if weights is None else torch.dot(weights, z)


def router_z_losses(
    routings: list[Routing] | list[LossSums], mask: torch.Tensor | None, stacked: dict | None = None
) -> torch.Tensor:
    """:func:`router_z_loss` of each of L layers routing the same tokens, ``[L]``."""
    if isinstance(routings[0], LossSums):
        return summed(routings, stacked)[2]
    z = torch.logsumexp(stack_field(routings, "logits", stacked), dim=-1).square()  # [L, T]
    weights = cached_token_weights(mask, z.dtype, stacked)
    return z.mean(dim=1) if weights is None else z @ weights


def cv_squared(values: torch.Tensor, weights: torch.Tensor | None = None, correction: int = 0) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` of ``values``, entries weighted 0/1 by ``weights``.

    ``correction=0``: population variance (Shazeer's tensor2tensor code); 1: sample variance
    (LoRAMoE's code). The 1e-10 keeps an all-zero vector at 0, as both do.
    """
    weights = torch.ones_like(values) if weights is None else weights.to(values.dtype).expand_as(values)
    count = weights.sum()
    mean = (values * weights).sum() / count.clamp_min(1.0)
    var = ((values - mean) ** 2 * weights).sum() / (count - correction).clamp_min(1.0)
    return var / (mean**2 + 1e-10)


def importance_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """Shazeer et al. 2017: ``CV(Importance)^2``, ``Importance_i`` = sum over real tokens of gate weight ``g_i``.

    0 when every expert gets the same total weight; unlike the load-balancing loss, the gradient
    flows through the weights themselves (not a detached dispatch count).
    """
    return cv_squared(masked_mean(routing.weights, mask))


def entropy_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens of the gate's entropy ``-sum_i p_i log p_i`` (summed over selectors).

    The selectors are ``routing.selectors`` (DSelect-k's k single-expert selectors) or else the
    softmax ``probs``. Sign convention: a positive coefficient *minimises* entropy (sharper,
    more decisive gates: DSelect-k's regulariser, the "dynamic loss" of top-p routing); a
    negative one maximises it (smoother gates). ``log`` is clamped so exact zeros (smooth-step
    selectors) give a finite gradient.
    """
    selectors = routing.selectors if routing.selectors is not None else routing.probs.unsqueeze(-2)
    entropy = -(selectors * selectors.clamp_min(1e-12).log()).sum(dim=(-1, -2))
    return masked_mean(entropy.unsqueeze(-1), mask)[0]


def localized_balance_loss(
    routing: Routing, mask: torch.Tensor | None, group_ids: torch.Tensor | None, num_groups: int, delta: float
) -> torch.Tensor:
    """LoRAMoE (Dou et al. 2024) localized balancing constraint.

    Experts are split in order into ``num_groups`` equal groups; each example m has a group label
    (its sample type). ``Q[m, i]`` = sum of expert i's gate weight over m's real tokens,
    ``I[m, i] = 1 + delta`` if expert i is in m's group else ``1 - delta``, ``Z = I * Q``, and the
    loss is ``CV(Z)^2`` over all entries (LoRAMoE's code: sample variance / mean^2; the paper
    writes var / mean). Examples with no real token count nowhere.
    """
    from .routing.levels import per_example

    weights = routing.weights
    batch, n = weights.shape[0], weights.shape[-1]
    per_token = weights.reshape(batch, -1, n)
    real_rows = None
    if mask is not None:
        mask = mask.reshape(batch, -1, 1).to(per_token.dtype)
        per_token = per_token * mask
        real_rows = (mask.sum(dim=1) > 0).to(per_token.dtype)  # [batch, 1]
    ids = per_example(group_ids, batch, "group_ids", "MoPEConfig.localized_balance_coef > 0")
    if ids.device.type == "cpu" and (bool((ids < 0).any()) or bool((ids >= num_groups).any())):  # as task ids
        raise ValueError(f"group_ids must lie in [0, num_groups={num_groups}), got {ids.tolist()}.")
    ids = ids.to(weights.device)
    ids = ids.repeat_interleave(batch // ids.shape[0])
    expert_group = torch.arange(n, device=weights.device) * num_groups // n
    own = expert_group.unsqueeze(0) == ids.unsqueeze(1)
    z = per_token.sum(dim=1) * torch.where(own, 1.0 + delta, 1.0 - delta)
    return cv_squared(z, real_rows, correction=1)


def localized_balance_inputs(inputs, router) -> dict:
    """What the localized balancing loss needs beyond the mask: the group labels and the router's groups."""
    return {"group_ids": inputs.group_ids, "num_groups": router.num_groups, "delta": router.group_delta}


@dataclass(frozen=True)
class AuxLoss:
    """A loss, the config field that weights it, its function, and what else it reads.

    ``extra(inputs, router) -> kwargs``: for losses that need more than the routing and the
    token mask (e.g. per-example group labels from the routing inputs); None for the others.
    ``batched(routings, mask, stacked) -> [L]``: the same loss for L layers at once (same token shape,
    device and mask), or None: then :meth:`values` calls ``fn`` per layer.
    """

    name: str
    coef_field: str
    fn: Callable[..., torch.Tensor]
    extra: Callable[[Any, Any], dict] | None = None
    batched: Callable[[list[Routing], torch.Tensor | None, dict | None], torch.Tensor] | None = None

    def values(self, records: list[Any], stacked: dict | None = None) -> torch.Tensor:
        """The loss of each recorded layer (``mope.routing.context.LossRecord``), ``[len(records)]`` in some order.

        Layers are batched where ``batched`` exists and they share token shape, device and mask
        (all layers of a decoder do; an encoder-decoder makes two batches); ``stacked``, shared by the
        losses of one forward, stacks each layer tensor they read once (:func:`~mope.routing.base.stack_tokens`).
        Computed outside autocast: the routers score in fp32, and the masked means here are matrix products,
        which autocast would run in bf16/fp16 (the aux loss then lost its precision under mixed precision).
        """
        with torch.autocast(batch_key(records[0])[2].type, enabled=False):
            if self.batched is None:
                values = [self.fn(r.routing, r.mask, **r.extra).reshape(1) for r in records]
            else:
                values = [self.batched([r.routing for r in b], b[0].mask, stacked) for b in batches(records)]
        if len(values) == 1:
            return values[0]
        device = values[0].device
        return torch.cat([v.to(device) for v in values])


def batch_key(record: Any) -> tuple:
    """What records computed together share besides their mask: the kind, the token shape and the device."""
    routing = record.routing
    tensor = routing.stats if isinstance(routing, LossSums) else routing.weights
    return type(routing), tensor.shape, tensor.device


def batches(records: list[Any]) -> list[list[Any]]:
    """``records`` grouped by :func:`batch_key` and the mask itself (compared by identity, not by ``id()``: in a
    compiled graph each ``id()`` of a tensor becomes a guard, so a new batch's mask recompiled every step)."""
    groups: list[tuple[tuple, Any, list[Any]]] = []
    for record in records:
        key = batch_key(record)
        for other_key, mask, members in groups:
            if other_key == key and mask is record.mask:
                members.append(record)
                break
        else:
            groups.append((key, record.mask, [record]))
    return [members for _, _, members in groups]


AUX_LOSSES: tuple[AuxLoss, ...] = (
    AuxLoss("load_balancing", "aux_loss_coef", load_balancing_loss, batched=load_balancing_losses),
    AuxLoss("z_loss", "z_loss_coef", router_z_loss, batched=router_z_losses),
    AuxLoss("importance", "importance_loss_coef", importance_loss),
    AuxLoss("entropy", "entropy_loss_coef", entropy_loss),
    AuxLoss("localized_balance", "localized_balance_coef", localized_balance_loss, localized_balance_inputs),
)


def check_losses_reach_routers(model: nn.Module, adapters: set[str], continues_cache: bool = False) -> None:
    """Refuse a training forward whose router losses (of ``adapters``) cannot train any of their routers.

    Reentrant gradient checkpointing (``use_reentrant=True``, which PEFT's
    ``prepare_model_for_kbit_training`` selects by default) runs each checkpointed layer's first
    forward without autograd and recomputes it in the backward; the routings mope keeps for its
    losses come from that first forward, so ``aux_loss`` is added to ``loss`` but none of its
    gradient reaches a router. So too a forward that continues a KV cache (``continues_cache``) made
    under ``torch.no_grad``: sequence-level routing reuses that forward's decisions. Called only when
    ``aux`` has no gradient while autograd is on, so the normal path costs one flag read.
    """
    # those adapters' routers only: a frozen active adapter's losses beside another adapter set trainable are fine
    routers = tuple(f"mope_router.{name}." for name in adapters)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and any(r in name for r in routers)]
    if trainable and continues_cache:
        raise ValueError(
            "MoPE's router losses cannot train the routers in this forward: it continues a KV cache "
            "(past_key_values), and sequence-level routing reuses the decisions of the forward that made the cache, "
            f"which ran without autograd (torch.no_grad; e.g. '{trainable[0]}'). Train on whole sequences (no "
            "past_key_values), or set the loss coefficients (aux_loss_coef, z_loss_coef, ...) to 0 to train without "
            "router losses."
        )
    if trainable:
        raise ValueError(
            "MoPE's router losses cannot train the routers in this forward: the routers ran without autograd "
            f"(e.g. '{trainable[0]}'), which is what reentrant gradient checkpointing does "
            "(gradient_checkpointing_kwargs={'use_reentrant': True}, or PEFT's prepare_model_for_kbit_training "
            "without gradient_checkpointing_kwargs). Use gradient_checkpointing_kwargs={'use_reentrant': False}, "
            "or set the loss coefficients (aux_loss_coef, z_loss_coef, ...) to 0 to train without router losses."
        )
