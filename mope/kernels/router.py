"""The top-k router in Triton: one kernel forward, two backward.

Computes what :class:`mope.routing.TopKRouter` computes from its fp32 input ``x [T, D]`` and
scoring weight ``W [N, D]``: ``logits = (x W^T) / temperature``, the k largest per token, and their
weights, either the softmax over the k kept logits (``softmax_then_topk``, renormalised) or the full
softmax's values there (``softmax_then_topk_unnormalised``, Switch); zeros elsewhere. Forward
(``top_k_route``): the GEMM, the top-k, the fp32 softmax and the scatter into ``[T, N]`` in one
kernel, where torch launches six or more (linear, topk, a full of -inf, scatter, add, softmax).
Backward: ``top_k_route_backward`` turns the gradients of the weights and of the logits (the
losses read the logits) into the score's gradient ``d`` and ``grad_x = d W`` in one kernel;
``scores_outer`` gives ``grad_W = d^T x``.

A token's N logits lie in one tile (N rounded up to a power of two, at least 16 for ``tl.dot``), so
every reduction over experts stays inside a program. Ties: among equal logits the lowest expert
index is kept first, so exactly k are kept; torch's ``topk`` also keeps exactly k but which of the
tied experts it keeps is its implementation's (not the lowest index on CPU). The products run in
IEEE fp32 (``input_precision="ieee"``, never TF32): routers score in fp32 because rounding flips
choices.

The full softmax and the load that the losses read stay deferred torch ops on the returned logits
(:class:`~mope.routing.base.Deferred`), as in the torch router: nothing is computed for them unless
read. Where the layer runs as one kernel call (:mod:`mope.kernels.layer`) and its only losses are the
default ones (load balancing, z-loss), the router's launch also sums what they need over each block of
tokens (:class:`mope.losses.LossSums`), and ``top_k_route_backward`` adds their gradient per token: the
losses then take no op per token and no stack of every layer's ``[T, N]`` logits. Under
``torch.compile`` the kernels run as the custom ops ``mope::route_top_k`` and its backward (see
:mod:`mope.kernels.lora` for why custom ops, not ``triton_op``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import cdiv, first_order_only, flat_rows, launch_options, next_power_of_2, on_inputs_device

BLOCK = 32  # token rows per program, and the columns of D per step
MIN_EXPERTS = 16  # the expert tile is at least this wide: every tl.dot operand dimension must be >= 16


@triton.jit
def token_tile(tokens, num_experts, BM: tl.constexpr, NP: tl.constexpr):
    """This program's rows of tokens and every expert: indices, bounds, and the offsets of a ``[T, N]`` tile."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    experts = tl.arange(0, NP)
    rows_ok, experts_ok = rows < tokens, experts < num_experts
    tile = rows[:, None] * num_experts + experts[None, :]
    return rows, experts, rows_ok, experts_ok, tile, rows_ok[:, None] & experts_ok[None, :]


@triton.jit
def top_k_route(
    x_ptr,
    w_ptr,
    logits_ptr,
    weights_ptr,
    chosen_ptr,
    tokens,
    width,
    num_experts,
    temperature,
    token_weights_ptr,
    stats_ptr,
    counts_ptr,
    K: tl.constexpr,
    NORMALISE: tl.constexpr,
    STATS: tl.constexpr,
    TOKEN_WEIGHTS: tl.constexpr,
    COUNTS: tl.constexpr,
    BM: tl.constexpr,
    NP: tl.constexpr,
    BK: tl.constexpr,
):
    """Logits, the k chosen experts (largest first, lowest index first among ties) and their weights; with
    ``COUNTS`` also how many of this program's tokens chose each expert, row ``program_id(0)`` of ``counts [blocks,
    N]`` (what :func:`mope.kernels.grouped.sort_pairs` counts, so the grouped experts' sort skips a launch)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    kept = route_tile(
        x_ptr, w_ptr, logits_ptr, weights_ptr, chosen_ptr, token_weights_ptr, stats_ptr, rows, tokens, width,
        num_experts, temperature, K, NORMALISE, STATS, TOKEN_WEIGHTS, BM, NP, BK,
    )  # fmt: skip
    if COUNTS:
        experts = tl.arange(0, NP)
        counts = tl.sum((kept & (rows < tokens)[:, None]).to(tl.int32), axis=0)
        tl.store(counts_ptr + tl.program_id(0) * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def route_tile(
    x_ptr, w_ptr, logits_ptr, weights_ptr, chosen_ptr, token_weights_ptr, stats_ptr, rows, tokens, width,
    num_experts, temperature, K: tl.constexpr, NORMALISE: tl.constexpr, STATS: tl.constexpr,
    TOKEN_WEIGHTS: tl.constexpr, BM: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """:func:`top_k_route` for the token rows ``rows``; with ``STATS`` also their row of the losses' sums
    (:class:`mope.losses.LossSums`), row ``program_id(0)`` of ``stats_ptr``. Returns the kept mask ``[BM, NP]``."""
    experts = tl.arange(0, NP)
    rows_ok, experts_ok = rows < tokens, experts < num_experts
    tile = rows[:, None] * num_experts + experts[None, :]
    tile_ok = rows_ok[:, None] & experts_ok[None, :]
    acc = tl.zeros((BM, NP), dtype=tl.float32)
    for k0 in range(0, width, BK):
        ks = k0 + tl.arange(0, BK)
        ks_ok = ks < width
        x = tl.load(x_ptr + rows[:, None] * width + ks[None, :], mask=rows_ok[:, None] & ks_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + experts[None, :] * width + ks[:, None], mask=experts_ok[None, :] & ks_ok[:, None], other=0.0
        )
        acc = tl.dot(x, w, acc, input_precision="ieee")
    logits = acc / temperature
    tl.store(logits_ptr + tile, logits, mask=tile_ok)
    weights, kept = top_k_of(logits, experts, experts_ok, chosen_ptr + rows * K, rows_ok, True, K, NORMALISE, NP)
    tl.store(weights_ptr + tile, weights, mask=tile_ok)
    if STATS:
        tw = token_weights_of(token_weights_ptr, rows, rows_ok, tokens, TOKEN_WEIGHTS)
        probs, lse = softmax_lse(logits, experts_ok)
        sums = stats_ptr + tl.program_id(0) * (2 * num_experts + 1)
        tl.store(sums + experts, tl.sum(tw[:, None] * probs, axis=0), mask=experts_ok)
        tl.store(sums + num_experts + experts, tl.sum(tl.where(kept, tw[:, None], 0.0), axis=0) / K, mask=experts_ok)
        tl.store(sums + 2 * num_experts, tl.sum(tw * lse * lse, axis=0))
    return kept


@triton.jit
def softmax_lse(logits, experts_ok):
    """The full softmax of logits ``[BM, NP]`` over the real experts, and its logsumexp ``[BM]``."""
    real = tl.where(experts_ok[None, :], logits, -float("inf"))
    top = tl.max(real, axis=1)
    e = tl.where(experts_ok[None, :], tl.exp(real - top[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    return e / total[:, None], top + tl.log(total)


@triton.jit
def token_weights_of(token_weights_ptr, rows, rows_ok, tokens, TOKEN_WEIGHTS: tl.constexpr):
    """Each row's weight in the losses' means: given (a padding mask over its count), else ``1 / tokens``."""
    if TOKEN_WEIGHTS:
        return tl.load(token_weights_ptr + rows, mask=rows_ok, other=0.0)
    else:
        return tl.where(rows_ok, 1.0 / tokens, 0.0)


@triton.jit
def top_k_of(logits, experts, experts_ok, chosen_ptrs, rows_ok, STORE_CHOSEN: tl.constexpr, K: tl.constexpr,
             NORMALISE: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    """The gate weights of logits ``[BM, NP]`` (zero where not kept) and the kept mask; with ``STORE_CHOSEN``
    the k chosen experts (largest first, lowest index first among ties) go to ``chosen_ptrs[:, i]``.

    Each pick is among the real experts not yet kept, so a token whose logits are all -inf or NaN still gets k
    distinct experts in ``[0, N)`` (an index past them made the grouped sort write out of bounds). NaN ranks above
    +inf, as in ``torch.topk``: such a token's weights, and so its output row, are NaN, as the torch path's are.
    """
    top = tl.max(tl.where(experts_ok[None, :], logits, -float("inf")), axis=1)
    nan = logits != logits
    kept = (logits < 0) & (logits > 0)  # all False
    for i in tl.static_range(K):
        free = experts_ok[None, :] & ~kept
        free_nan = free & nan
        best = tl.max(tl.where(free & ~nan, logits, -float("inf")), axis=1)
        any_nan = tl.max(free_nan.to(tl.int32), axis=1) > 0
        candidates = tl.where(any_nan[:, None], free_nan, free & (logits == best[:, None]))
        index = tl.min(tl.where(candidates, experts[None, :], NP), axis=1)
        if STORE_CHOSEN:
            tl.store(chosen_ptrs + i, index.to(tl.int64), mask=rows_ok)
        kept = kept | (experts[None, :] == index[:, None])
    e = tl.where(experts_ok[None, :], tl.exp(logits - top[:, None]), 0.0)
    total = tl.sum(tl.where(kept, e, 0.0), axis=1) if NORMALISE else tl.sum(e, axis=1)
    return tl.where(kept, e / total[:, None], 0.0), kept


@triton.jit
def top_k_route_backward(
    grad_logits_ptr,
    grad_weights_ptr,
    logits_ptr,
    weights_ptr,
    chosen_ptr,
    w_ptr,
    grad_scores_ptr,
    grad_x_ptr,
    grad_stats_ptr,
    token_weights_ptr,
    tokens,
    width,
    num_experts,
    temperature,
    stats_rows,
    GRAD_X: tl.constexpr,
    K: tl.constexpr,
    NORMALISE: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    PER_PAIR: tl.constexpr,
    HAS_GRAD_LOGITS: tl.constexpr,
    HAS_GRAD_STATS: tl.constexpr,
    TOKEN_WEIGHTS: tl.constexpr,
    BM: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
):
    """``d = (softmax backward of the weights' gradient + the logits' gradient) / temperature``; ``grad_x = d W``.

    Renormalised: the weights ``v`` are the softmax over the kept logits, ``d_l = v (g - sum v g)``.
    Unnormalised: ``v`` is the full softmax and only the kept weights' gradients ``g`` count. A
    gradient that autograd did not give (``HAS_GRAD_*`` false: no loss read the logits) counts as 0
    without being read, so nobody fills a tensor of zeros for it. The losses' sums (``HAS_GRAD_STATS``,
    rows of ``stats_rows`` tokens, :func:`route_tile`): ``w p (g_P - sum p g_P + 2 g_Z lse)`` per token, where
    the sums were ``sum w p``, ``sum w kept / k`` (a count: no gradient) and ``sum w lse^2``. ``PER_PAIR``: the
    weights' gradient is given at the chosen experts only, ``[T, k]`` (the grouped experts' own).
    """
    rows, experts, rows_ok, experts_ok, tile, tile_ok = token_tile(tokens, num_experts, BM, NP)
    g = tl.zeros((BM, NP), dtype=tl.float32)
    if HAS_GRAD_WEIGHTS:
        if PER_PAIR:
            for i in tl.static_range(K):
                index = tl.load(chosen_ptr + rows * K + i, mask=rows_ok, other=-1)
                g_i = tl.load(grad_weights_ptr + rows * K + i, mask=rows_ok, other=0.0)
                g = tl.where(experts[None, :] == index[:, None], g_i[:, None], g)
        else:
            g = tl.load(grad_weights_ptr + tile, mask=tile_ok, other=0.0)
    d = scores_gradient_tile(
        g, rows, experts, rows_ok, experts_ok, tile, tile_ok, grad_logits_ptr, logits_ptr, weights_ptr, chosen_ptr,
        grad_stats_ptr, token_weights_ptr, tokens, num_experts, temperature, stats_rows, K, NORMALISE,
        HAS_GRAD_WEIGHTS, HAS_GRAD_LOGITS, HAS_GRAD_STATS, TOKEN_WEIGHTS,
    )  # fmt: skip
    tl.store(grad_scores_ptr + tile, d, mask=tile_ok)
    if GRAD_X:
        for n0 in range(0, width, BN):
            cols = n0 + tl.arange(0, BN)
            cols_ok = cols < width
            w = tl.load(
                w_ptr + experts[:, None] * width + cols[None, :], mask=experts_ok[:, None] & cols_ok[None, :], other=0.0
            )
            grad_x = tl.dot(d, w, input_precision="ieee")
            x_ok = rows_ok[:, None] & cols_ok[None, :]
            tl.store(grad_x_ptr + rows[:, None] * width + cols[None, :], grad_x, mask=x_ok)


@triton.jit
def scores_gradient_tile(
    g, rows, experts, rows_ok, experts_ok, tile, tile_ok, grad_logits_ptr, logits_ptr, weights_ptr, chosen_ptr,
    grad_stats_ptr, token_weights_ptr, tokens, num_experts, temperature, stats_rows, K: tl.constexpr,
    NORMALISE: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr,
    HAS_GRAD_STATS: tl.constexpr, TOKEN_WEIGHTS: tl.constexpr,
):  # fmt: skip
    """:func:`top_k_route_backward`'s ``d`` for one tile of rows and experts (``tile``: their offsets in ``[T, N]``),
    given the weights' gradient there, ``g`` (any power-of-two width of at least N; read with ``HAS_GRAD_WEIGHTS``)."""
    d = tl.zeros_like(g)
    if HAS_GRAD_WEIGHTS:
        if NORMALISE:
            v = tl.load(weights_ptr + tile, mask=tile_ok, other=0.0)
        else:
            logits = tl.load(logits_ptr + tile, mask=tile_ok, other=0.0)
            logits = tl.where(experts_ok[None, :], logits, -float("inf"))  # rows past the end stay finite
            e = tl.where(experts_ok[None, :], tl.exp(logits - tl.max(logits, axis=1)[:, None]), 0.0)
            v = e / tl.sum(e, axis=1)[:, None]
            kept = tile < 0
            for i in tl.static_range(K):
                index = tl.load(chosen_ptr + rows * K + i, mask=rows_ok, other=-1)
                kept = kept | (experts[None, :] == index[:, None])
            g = tl.where(kept, g, 0.0)
        d = v * (g - tl.sum(v * g, axis=1)[:, None])
    if HAS_GRAD_LOGITS:
        d = d + tl.load(grad_logits_ptr + tile, mask=tile_ok, other=0.0)
    if HAS_GRAD_STATS:
        probs, lse = softmax_lse(tl.load(logits_ptr + tile, mask=tile_ok, other=0.0), experts_ok)
        tw = token_weights_of(token_weights_ptr, rows, rows_ok, tokens, TOKEN_WEIGHTS)
        sums = grad_stats_ptr + (rows // stats_rows) * (2 * num_experts + 1)
        gp = tl.load(sums[:, None] + experts[None, :], mask=tile_ok, other=0.0)
        g_z = tl.load(sums + 2 * num_experts, mask=rows_ok, other=0.0)
        d = d + tw[:, None] * probs * (gp - tl.sum(probs * gp, axis=1)[:, None] + 2.0 * (g_z * lse)[:, None])
    return d / temperature


@triton.jit
def scores_outer(
    d_ptr,
    x_ptr,
    out_ptr,
    tokens,
    width,
    num_experts,
    NP: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
):
    """``out[N, D] = d[T, N]^T @ x[T, D]`` on one tile of D's columns (sums over T): the weight's gradient."""
    scores_tile(d_ptr, x_ptr, out_ptr, tl.program_id(0) * BN + tl.arange(0, BN), tokens, width, num_experts, NP, BT, BN)


@triton.jit
def scores_tile(
    d_ptr, x_ptr, out_ptr, cols, tokens, width, num_experts, NP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr
):
    """:func:`scores_outer` for the columns ``cols``."""
    experts = tl.arange(0, NP)
    experts_ok, cols_ok = experts < num_experts, cols < width
    acc = tl.zeros((NP, BN), dtype=tl.float32)
    for t0 in range(0, tokens, BT):
        rows = t0 + tl.arange(0, BT).to(tl.int64)
        rows_ok = rows < tokens
        d = tl.load(
            d_ptr + rows[:, None] * num_experts + experts[None, :],
            mask=rows_ok[:, None] & experts_ok[None, :],
            other=0.0,
        )
        x = tl.load(x_ptr + rows[:, None] * width + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(d), x, acc, input_precision="ieee")
    tl.store(out_ptr + experts[:, None] * width + cols[None, :], acc, mask=experts_ok[:, None] & cols_ok[None, :])


def expert_tile(num_experts: int) -> int:
    return max(MIN_EXPERTS, next_power_of_2(num_experts))


def route(x: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, normalise: bool, sums=None, counts=False):
    """Flat fp32 ``x [T, D]``, ``weight [N, D]`` -> logits ``[T, N]``, weights ``[T, N]``, chosen ``[T, k]``.

    ``sums``: a :class:`mope.losses.LossSums` to fill (the router losses' sums, rows of ``BLOCK`` tokens).
    ``counts``: then also ``(counts, pairs per block)``, how many of each block's ``BLOCK * k`` (token-major) pairs
    chose each expert, ``[blocks, N]`` int32, for :func:`mope.kernels.grouped.sort_pairs`.
    """
    tokens, width = x.shape
    num_experts = weight.shape[0]
    logits = x.new_empty(tokens, num_experts)
    weights = torch.empty_like(logits)
    chosen = x.new_empty(tokens, k, dtype=torch.long)
    blocks = cdiv(tokens, BLOCK)
    counted = (x.new_empty(blocks, num_experts, dtype=torch.int32), BLOCK * k) if counts else None
    stats, token_weights = sums.start(x, num_experts, BLOCK) if sums is not None else (logits, None)
    top_k_route[(blocks,)](
        x, weight, logits, weights, chosen, tokens, width, num_experts, temperature,
        logits if token_weights is None else token_weights, stats, counted[0] if counts else logits, K=k,
        NORMALISE=normalise, STATS=sums is not None, TOKEN_WEIGHTS=token_weights is not None, COUNTS=counts,
        BM=BLOCK, NP=expert_tile(num_experts), BK=BLOCK, **launch_options(),
    )  # fmt: skip
    return (logits, weights, chosen, counted) if counts else (logits, weights, chosen)


def route_gradients(
    grad_logits, grad_weights, x, weight, logits, weights, chosen, temperature: float, normalise: bool, needs,
    grad_sums=None,
) -> list[torch.Tensor | None]:  # fmt: skip
    """The gradients of ``x`` and ``weight`` (None where ``needs`` says no): 2 kernels at most.

    ``grad_logits`` / ``grad_weights`` may be None (no loss read that output): they count as zeros;
    ``grad_sums``: see :func:`scores_gradient`.
    """
    tokens, width = x.shape
    num_experts = weight.shape[0]
    grad_x = torch.empty_like(x) if needs[0] else None
    grad_scores = scores_gradient(
        grad_logits, grad_weights, logits, weights, chosen, weight, temperature, normalise, grad_x, grad_sums=grad_sums
    )
    grad_weight = None
    if needs[1]:
        grad_weight = torch.empty_like(weight)
        scores_outer[(cdiv(width, BLOCK),)](
            grad_scores, x, grad_weight, tokens, width, num_experts, NP=expert_tile(num_experts), BT=BLOCK, BN=BLOCK,
            **launch_options(),
        )  # fmt: skip
    return [grad_x, grad_weight]


def scores_gradient(
    grad_logits, grad_weights, logits, weights, chosen, weight, temperature: float, normalise: bool, grad_x=None,
    grad_sums=None, per_pair=False,
) -> torch.Tensor:  # fmt: skip
    """The scores' gradient ``d [T, N]`` (one launch); given fp32 ``grad_x [T, D]``, also ``d W`` written into it.
    ``grad_sums``: a :class:`mope.losses.LossSums`' ``(token_weights, rows, the gradient of its stats)`` or None.
    ``per_pair``: ``grad_weights`` holds the chosen experts' only, ``[T, k]`` (zero elsewhere)."""
    tokens, num_experts = logits.shape
    grad_scores = torch.empty_like(logits)
    (grad_logits_ptr, grad_stats_ptr, token_weights_ptr), stats_rows, flags = loss_gradients(
        logits, grad_logits, grad_sums
    )
    top_k_route_backward[(cdiv(tokens, BLOCK),)](
        grad_logits_ptr, logits if grad_weights is None else grad_weights.contiguous(),
        logits, weights, chosen, weight, grad_scores, grad_x if grad_x is not None else grad_scores,
        grad_stats_ptr, token_weights_ptr, tokens, weight.shape[1], num_experts, temperature, stats_rows,
        K=chosen.shape[1], NORMALISE=normalise, GRAD_X=grad_x is not None, HAS_GRAD_WEIGHTS=grad_weights is not None,
        PER_PAIR=per_pair, **flags, BM=BLOCK, NP=expert_tile(num_experts), BN=BLOCK, **launch_options(),
    )  # fmt: skip
    return grad_scores


def loss_gradients(logits, grad_logits, grad_sums) -> tuple[tuple, int, dict[str, bool]]:
    """What a launch of :func:`scores_gradient_tile` reads of the losses' gradients: the pointers of the logits'
    gradient, the sums' gradient and the token weights (the logits stand in for one autograd did not give), the
    sums' rows per block, and the flags saying which are real."""
    token_weights, stats_rows, grad_stats = grad_sums if grad_sums is not None else (None, 1, None)
    pointers = (  # the token weights are the losses' own, contiguous
        logits if grad_logits is None else grad_logits.contiguous(),
        logits if grad_stats is None else grad_stats.contiguous(),
        logits if token_weights is None else token_weights,
    )
    flags = {
        "HAS_GRAD_LOGITS": grad_logits is not None,
        "HAS_GRAD_STATS": grad_stats is not None,
        "TOKEN_WEIGHTS": token_weights is not None,
    }
    return pointers, stats_rows, flags


class RouteTopK(torch.autograd.Function):
    """:func:`route` with its gradients (the chosen experts have none), for ``x`` of any token shape.

    Flattened inside the Function, where autograd does not track the views (see
    :class:`mope.kernels.lora.RoutedLoRA`).
    """

    @staticmethod
    def forward(ctx, x, weight, k: int, temperature: float, normalise: bool):
        flat = flat_rows(x)
        logits, weights, chosen = route(flat, weight, k, temperature, normalise)
        ctx.save_for_backward(flat, weight, logits, weights, chosen)
        ctx.temperature, ctx.normalise, ctx.x_shape = temperature, normalise, x.shape
        ctx.mark_non_differentiable(chosen)
        # no zero gradient is built for ``chosen`` (or an unused output): one fill kernel less per layer
        ctx.set_materialize_grads(False)
        token_shape = x.shape[:-1]
        return logits.view(*token_shape, -1), weights.view(*token_shape, -1), chosen.view(*token_shape, k)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logits, grad_weights, grad_chosen):
        x, weight, logits, weights, chosen = ctx.saved_tensors
        flat = [None if g is None else g.reshape(-1, g.shape[-1]) for g in (grad_logits, grad_weights)]
        grad_x, grad_weight = route_gradients(
            *flat, x, weight, logits, weights, chosen, ctx.temperature, ctx.normalise, ctx.needs_input_grad[:2]
        )
        return None if grad_x is None else grad_x.view(*ctx.x_shape), grad_weight, None, None, None


# torch.compile: the same kernels as custom ops (why custom ops: mope.kernels.lora) ------------------------


@torch.library.custom_op("mope::route_top_k", mutates_args=())
def route_op(
    x: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return route(x, weight, k, temperature, normalise)


@route_op.register_fake
def route_shapes(x, weight, k, temperature, normalise):
    logits = x.new_empty(x.shape[0], weight.shape[0])
    return logits, torch.empty_like(logits), x.new_empty(x.shape[0], k, dtype=torch.long)


@torch.library.custom_op("mope::route_top_k_backward", mutates_args=())
def route_backward_op(
    grad_logits: torch.Tensor | None, grad_weights: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
    logits: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, temperature: float, normalise: bool,
    needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """:func:`route_gradients` as an op: an empty tensor where a gradient is not needed."""
    grads = route_gradients(
        grad_logits, grad_weights, x, weight, logits, weights, chosen, temperature, normalise, needs
    )
    return [x.new_empty(0) if g is None else g for g in grads]


@route_backward_op.register_fake
def route_backward_shapes(grad_logits, grad_weights, x, weight, logits, weights, chosen, temperature, normalise, needs):
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip((x, weight), needs, strict=True)]


def save_for_op_backward(ctx, inputs, output) -> None:
    x, weight, _, temperature, normalise = inputs
    ctx.save_for_backward(x, weight, *output)
    ctx.temperature, ctx.normalise = temperature, normalise


def route_op_backward(ctx, grad_logits, grad_weights, grad_chosen):
    x, weight, logits, weights, chosen = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    grads = route_backward_op(
        grad_logits, grad_weights, x, weight, logits, weights, chosen, ctx.temperature, ctx.normalise, needs
    )
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None


route_op.register_autograd(route_op_backward, setup_context=save_for_op_backward)


@on_inputs_device
def route_top_k(
    x: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[..., N]``, gate weights ``[..., N]`` and the chosen experts ``[..., k]`` of fp32 ``x [..., D]``.

    ``normalise``: the kept weights sum to 1 (softmax over the kept logits); else they are the full
    softmax's values. Needs at least one token (an empty grid is an error).
    """
    weight = weight.float().contiguous()
    if not torch.compiler.is_compiling():
        return RouteTopK.apply(x, weight, k, float(temperature), normalise)
    logits, weights, chosen = route_op(
        x.reshape(-1, x.shape[-1]).contiguous(), weight, k, float(temperature), normalise
    )
    token_shape = x.shape[:-1]
    return logits.view(*token_shape, -1), weights.view(*token_shape, -1), chosen.view(*token_shape, k)
