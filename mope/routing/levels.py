"""Routing levels: what a gate looks at, and how far its decision reaches.

- ``token``: each token's hidden state; one decision per token (the default).
- ``sequence``: the masked mean of the layer input over each sequence (padding excluded); one
  decision per sequence, broadcast to all its tokens (sentence-level gating).
- ``task``: a one-hot task id given as ``model(..., mope_task_ids=LongTensor[batch])``; the router's
  weight is then a learned ``[N, num_tasks]`` table of per-task logits (MOELoRA), and any gate
  (top-k, top-p, DSelect-k, ...) turns the task's logits into weights.

A level only changes the router's *input* and broadcasts the result, so every gate works at every
level (hash routing, which reads token ids, is token-level only). This module does not import
:mod:`mope.routing.base` (which imports it); it builds results with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


class DecisionCache:
    """Sequence-level decisions kept between forwards, so later tokens reuse the prompt's decision.

    A forward whose layers see only the newest tokens of a KV-cached sequence (``cache_step``)
    reuses the decision of the last full forward. Inside ``generate`` the cache is *pinned*: the
    first forward (the prompt) decides and every later one reuses it, with or without a KV
    cache, so cached and uncached generation agree. Decisions are kept detached (no gradient).
    """

    def __init__(self) -> None:
        self.decisions: dict[Any, Any] = {}
        self.pinned = False
        # generate's prompt mask ``[batch, prompt]``: the prompt's forward may get a 4-D mask instead (a static cache)
        self.prompt_mask: torch.Tensor | None = None

    def get(self, router: Any) -> Any:
        return self.decisions.get(router)

    def keep(self, router: Any, routing: Any) -> None:
        detached = {f.name: _map(getattr(routing, f.name), torch.Tensor.detach) for f in dataclasses.fields(routing)}
        self.decisions[router] = dataclasses.replace(routing, **detached)

    def clear(self) -> None:
        self.decisions = {}
        self.prompt_mask = None

    def mask_of_prompt(self, token_shape: torch.Size) -> torch.Tensor | None:
        """Inside generate, the prompt's ``[batch, seq]`` mask for a forward of the prompt's shape (repeated for
        beams), or None."""
        mask = self.prompt_mask
        if not self.pinned or mask is None or len(token_shape) != 2 or tuple(token_shape[1:]) != tuple(mask.shape[1:]):
            return None
        if token_shape[0] % mask.shape[0] != 0:
            return None
        return mask.repeat_interleave(token_shape[0] // mask.shape[0], dim=0)

    def forget(self, routers: list[Any]) -> None:
        """Drop ``routers``' decisions (a deleted adapter's: they kept its routers alive, one set per delete)."""
        for router in routers:
            self.decisions.pop(router, None)


def _map(value: Any, fn) -> Any:
    return fn(value) if isinstance(value, torch.Tensor) else value


def spread(routing: Any, token_shape: torch.Size) -> Any:
    """Broadcast a per-example Routing (tensors ``[batch, ...]``) to ``[*token_shape, ...]`` (views, no copy).

    Per-example tensors of a smaller batch are repeated to fit one that is a multiple of it:
    ``generate`` expands inputs that way for beams and ``num_return_sequences``.
    """
    batch, inner = token_shape[0], len(token_shape) - 1

    def widen(t: torch.Tensor) -> torch.Tensor:
        t = t.repeat_interleave(batch // t.shape[0], dim=0) if t.shape[0] != batch else t
        return t.reshape(batch, *([1] * inner), *t.shape[1:]).expand(*token_shape, *t.shape[1:])

    return dataclasses.replace(
        routing, **{f.name: _map(getattr(routing, f.name), widen) for f in dataclasses.fields(routing)}
    )


def per_example(
    ids: torch.Tensor | None, batch: int, name: str, hint: str, argument: str = "", expanded: bool = False
) -> torch.Tensor:
    """Check per-example labels (``task_ids`` / ``group_ids``): a 1-D integer tensor of ``batch`` entries, as int64.

    ``argument``: the model call's keyword that carries them, if not ``name``. ``expanded``: the batch may be a
    multiple of them (``generate`` repeats each example for beams and ``num_return_sequences``); elsewhere a
    shorter tensor is a mistake (a collator's), not a repetition.
    """
    if ids is None:
        raise ValueError(f"{hint} needs per-example {name}: call model(..., {argument or name}=LongTensor[batch]).")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer tensor [batch], got a {type(ids).__name__}.")
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor [batch], got {tuple(ids.shape)} {ids.dtype}.")
    fits = ids.shape[0] == batch or (expanded and ids.shape[0] > 0 and batch % ids.shape[0] == 0)
    if not fits:
        raise ValueError(f"{name} has {ids.shape[0]} entries but the batch has {batch} examples.")
    return ids.long()  # int16 / uint8 ids index as int64 (scatter takes no other)


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x [batch, ..., d]`` over its token dims, counting only mask == 1 (all tokens if None)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is None:
        return flat.mean(dim=1)
    weights = mask.reshape(x.shape[0], -1, 1).to(flat.dtype)
    return (flat * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def example_inputs(inputs: Any, batch: int) -> Any:
    """``inputs`` for one vector per example: no token ids, and a mask that leaves out the examples with no real
    token (all padding), so they take no capacity, count in no T, loss or statistic, as padding tokens do."""
    mask = inputs.token_mask
    if mask is not None:
        mask = mask.reshape(batch, -1).any(-1) if mask.numel() and mask.shape[0] == batch else None
    return dataclasses.replace(inputs, token_mask=mask, token_ids=None)


class TokenLevel:
    name = "token"

    def router_features(self, hidden: int, config: Any) -> int:
        return hidden

    def route(self, router: Any, x: torch.Tensor, inputs: Any) -> Any:
        return router.decide(x, inputs)


class SequenceLevel:
    """Decide on the masked mean-pool; reuse the prompt's decision on KV-cache steps and in generate.

    A layer whose input is ``[batch, hidden]`` (BERT's pooler, a classification head) already
    has one vector per example: it is routed as it is, unless it is one decoded token per
    example of a layer whose prompt kept a decision (a block that flattens its tokens, as
    Qwen2-MoE's shared expert does; the layer views the prompt's as ``[batch, seq, hidden]``).
    """

    name = "sequence"

    def router_features(self, hidden: int, config: Any) -> int:
        return hidden

    def route(self, router: Any, x: torch.Tensor, inputs: Any) -> Any:
        token_shape = x.shape[:-1]
        cache = inputs.decisions
        decision = cache.get(router) if cache is not None and (inputs.cache_step or cache.pinned) else None
        if decision is not None and token_shape[0] % decision.weights.shape[0] != 0:
            decision = None
        if len(token_shape) < 2 and decision is None:  # [batch, hidden]: one vector per example (a pooler, a head)
            return router.decide(x, dataclasses.replace(inputs, token_mask=None, token_ids=None))
        if decision is None:
            if inputs.cache_step:
                raise RuntimeError(
                    "routing_level='sequence': this forward continues a KV-cached sequence, but no decision "
                    "for its prompt was kept. Run the prompt through the model first (generate does); a training "
                    "forward (train mode, autograd on) keeps none, so train on whole sequences (no past_key_values)."
                )
            pooled = masked_mean_pool(x, inputs.token_mask)
            decision = router.decide(pooled, example_inputs(inputs, token_shape[0]))
            if cache is not None and not (router.training and torch.is_grad_enabled()):
                cache.keep(router, decision)  # for decoding steps; not in training (a compiled backward broke on it)
        return spread(decision, token_shape)


class TaskLevel:
    """Route by task id: the router scores a one-hot task vector, i.e. reads a column of its weight."""

    name = "task"

    def router_features(self, hidden: int, config: Any) -> int:
        return config.num_tasks

    def route(self, router: Any, x: torch.Tensor, inputs: Any) -> Any:
        token_shape = x.shape[:-1]
        num_tasks = router.weight.shape[-1]
        ids = inputs.task_ids
        if ids is None and router.fixed_task is not None:  # mope.fix_task: one task for every example
            ids = torch.full((token_shape[0],), router.fixed_task, device=x.device)
        in_generate = inputs.decisions is not None and inputs.decisions.pinned
        ids = per_example(ids, token_shape[0], "task_ids", "routing_level='task'", "mope_task_ids", in_generate)
        if ids.device.type == "cpu" and (bool((ids < 0).any()) or bool((ids >= num_tasks).any())):
            raise ValueError(f"task_ids must lie in [0, num_tasks={num_tasks}), got {ids.tolist()}.")
        ids = ids.to(x.device)
        one_hot = torch.zeros(ids.shape[0], num_tasks, device=x.device).scatter_(1, ids.unsqueeze(1), 1.0)
        decision = router.decide(one_hot, example_inputs(inputs, token_shape[0]))
        return spread(decision, token_shape)


ROUTING_LEVELS: dict[str, Any] = {"token": TokenLevel(), "sequence": SequenceLevel(), "task": TaskLevel()}
