"""A layer's top-k router and LoRA experts in one autograd Function (``dispatch="triton"``), or one custom op.

What :class:`mope.kernels.router.RouteTopK` followed by :class:`mope.kernels.lora.RoutedLoRA` or, where
only the chosen experts pay, :class:`mope.kernels.grouped.GroupedLoRA` compute, in one Function: it saves
the host's work between them, which bounds an eager GPU step at small widths. On this project's CPU,
with every Triton launch made to run nothing, a tiny Llama's training step took 1.94x a PEFT LoRA's
host time with the two Functions and 1.68x with this one (masked: 1.82x).

Over every expert it also launches fewer kernels than the two Functions: 2 forward instead of 3 (the
router's tiles and ``A_cat x``'s in one launch, :func:`route_down`) and 3 backward instead of 6 and an
add (``s B_cat^T grad`` with the gate's gradient; the scores' gradient ``d``; then the input's gradient with
the router's share ``d W`` and A's, B's and the router's weight gradients in one launch whose programs split
between them, :func:`layer_gradients`), 2 where one tile holds every expert's ranks (N r <= 64, as at top-2
of 8 with r = 8: the gate's gradient and from it the scores' in one launch, :func:`down_scores`). Over only
the chosen experts it takes 3 launches and a sum forward (the router, which also counts each block's pairs per
expert; the sort's placing; every pair's row, :func:`mope.kernels.grouped.grouped_pairs`) and 3 launches and a
sum backward, no zero fill (:func:`chosen_expert_gradients`: the gate's gradient per pair, the scores', then
the input's gradient per (token, expert) pair, with the router's ``d W`` on each token's first pair, and every
weight gradient in one launch, :func:`grouped_gradients`).

:meth:`mope.layer.MoPELayer.fuses` says when a layer takes it: one active adapter whose top-k
router the router kernel serves (no capacity, token-level, no hooks), plain fp32 LoRA experts
with no dropout, no shared experts. Its values and gradients are the two Functions'. Where the layer's
only router losses are the default ones, its router launch also fills a :class:`mope.losses.LossSums` (their
sums per block of tokens), so the losses read no logits (eager only). Under ``torch.compile`` the
every-expert form runs as the custom ops ``mope::routed_layer`` and its backward (the same launches),
so a compiled step calls one op per layer where the modules' ops made two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..losses import LossSums
from . import grouped
from .grid import cdiv, flat_rows
from .grouped import GroupedState, grouped_forward, grouped_outer_tile, grouped_up_tile
from .lora import BLOCK, Tiles, down, down_product, down_tile, gate_gradient, grouped_pays, outer_tile, up, up_tile
from .router import (
    expert_tile,
    loss_gradients,
    route,
    route_gradients,
    route_tile,
    scores_gradient,
    scores_gradient_tile,
    scores_tile,
)


@triton.jit
def route_down(
    x_ptr, router_w_ptr, logits_ptr, weights_ptr, chosen_ptr, a_ptr, h_ptr, token_weights_ptr, stats_ptr,
    tokens, width, num_experts, rank, temperature, expert_blocks,
    K: tl.constexpr, NORMALISE: tl.constexpr, STATS: tl.constexpr, TOKEN_WEIGHTS: tl.constexpr, NP: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr,
    BK: tl.constexpr,
):  # fmt: skip
    """The router's logits, weights and chosen experts, and ``h = A_cat x``, in one launch.

    Axis 1: programs ``[0, expert_blocks)`` take ``h``'s expert tiles, the last one routes the same rows.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    block = tl.program_id(1)
    if block < expert_blocks:
        down_tile(
            x_ptr, a_ptr, h_ptr, h_ptr, h_ptr, rows, block * EB, tokens, width, num_experts, rank, 1.0,
            False, DOT, PRECISION, BM, EB, RP, BK,
        )  # fmt: skip
    else:
        route_tile(
            x_ptr, router_w_ptr, logits_ptr, weights_ptr, chosen_ptr, token_weights_ptr, stats_ptr, rows, tokens,
            width, num_experts, temperature, K, NORMALISE, STATS, TOKEN_WEIGHTS, BM, NP, BK,
        )  # fmt: skip


def routed_down(x, router_weight, a_cat, k: int, temperature: float, normalise: bool, tiles: Tiles, sums=None):
    """:func:`route_down`: logits, weights ``[T, N]``, chosen experts ``[T, k]`` and ``h = A_cat x`` ``[T, N*r]``
    (``a_cat``: ``[N*r, D]`` or ``[N, r, D]``, contiguous); ``sums``: a :class:`mope.losses.LossSums` to fill too."""
    tokens, width = x.shape
    num_experts = router_weight.shape[0]
    logits = x.new_empty(tokens, num_experts)
    weights = torch.empty_like(logits)
    chosen = x.new_empty(tokens, k, dtype=torch.long)
    h = x.new_empty(tokens, tiles.num_experts * tiles.rank)
    stats, token_weights = sums.start(x, num_experts, BLOCK) if sums is not None else (logits, None)
    route_down[(cdiv(tokens, BLOCK), tiles.expert_blocks + 1)](
        x, router_weight, logits, weights, chosen, a_cat, h, logits if token_weights is None else token_weights,
        stats, tokens, width, num_experts, tiles.rank, temperature, tiles.expert_blocks, K=k, NORMALISE=normalise,
        STATS=sums is not None, TOKEN_WEIGHTS=token_weights is not None, NP=expert_tile(num_experts),
        DOT=tiles.dot, PRECISION=tiles.precision, BM=BLOCK, EB=tiles.eb, RP=tiles.rp, BK=BLOCK,
    )  # fmt: skip
    return logits, weights, chosen, h


@triton.jit
def down_scores(
    grad_out_ptr, b_ptr, grad_hg_ptr, h_ptr, grad_logits_ptr, logits_ptr, weights_ptr, chosen_ptr, grad_scores_ptr,
    grad_stats_ptr, token_weights_ptr, tokens, d_out, num_experts, rank, scale, temperature, stats_rows,
    K: tl.constexpr, NORMALISE: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr, HAS_GRAD_STATS: tl.constexpr,
    TOKEN_WEIGHTS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, EB: tl.constexpr,
    RP: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """``grad_hg = s * grad B_cat^T``, then from the gate's gradient (in registers) the scores' gradient ``d``, for one
    block of rows, where one tile holds every expert (``EB >= N``): the launch :func:`rank_down` and
    :func:`mope.kernels.router.top_k_route_backward` took in two."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    acc, cols, hg_ok = down_product(
        grad_out_ptr, b_ptr, grad_hg_ptr, rows, 0, tokens, d_out, num_experts, rank, scale, DOT, PRECISION, BM, EB, RP,
        BK,
    )  # fmt: skip
    g = gate_gradient(acc, h_ptr, rows, cols, hg_ok, num_experts * rank, BM, EB, RP)
    experts = tl.arange(0, EB)
    rows_ok, experts_ok = rows < tokens, experts < num_experts
    tile = rows[:, None] * num_experts + experts[None, :]
    tile_ok = rows_ok[:, None] & experts_ok[None, :]
    d = scores_gradient_tile(
        g, rows, experts, rows_ok, experts_ok, tile, tile_ok, grad_logits_ptr, logits_ptr, weights_ptr, chosen_ptr,
        grad_stats_ptr, token_weights_ptr, tokens, num_experts, temperature, stats_rows, K, NORMALISE, True,
        HAS_GRAD_LOGITS, HAS_GRAD_STATS, TOKEN_WEIGHTS,
    )  # fmt: skip
    tl.store(grad_scores_ptr + tile, d, mask=tile_ok)


def down_with_scores(
    grad_out, b_cat, h, logits, weights, chosen, grad_logits, grad_sums, temperature: float, normalise: bool,
    scaling: float, tiles: Tiles, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`down_scores`: ``s B_cat^T grad`` ``[T, N*r]`` and the scores' gradient ``d`` ``[T, N]`` in one launch
    (``tiles.expert_blocks == 1``; the weights' gradient is the experts' alone: no loss read the weights)."""
    tokens, d_out = grad_out.shape
    grad_hg = grad_out.new_empty(tokens, tiles.num_experts * tiles.rank, dtype=out_dtype)
    d = torch.empty_like(logits)
    (grad_logits_ptr, grad_stats_ptr, token_weights_ptr), stats_rows, flags = loss_gradients(
        logits, grad_logits, grad_sums
    )
    down_scores[(cdiv(tokens, BLOCK),)](
        grad_out, b_cat, grad_hg, h, grad_logits_ptr, logits, weights, chosen, d, grad_stats_ptr, token_weights_ptr,
        tokens, d_out, tiles.num_experts, tiles.rank, scaling, temperature, stats_rows, K=chosen.shape[1],
        NORMALISE=normalise, **flags, DOT=tiles.dot, PRECISION=tiles.precision, BM=BLOCK, EB=tiles.eb, RP=tiles.rp,
        BK=BLOCK,
    )  # fmt: skip
    return grad_hg, d


@triton.jit
def layer_gradients(
    grad_hg_ptr, h_ptr, gate_ptr, x_ptr, grad_out_ptr, d_ptr, a_ptr, router_w_ptr, grad_x_ptr, grad_a_ptr, grad_b_ptr,
    grad_w_ptr, tokens, d_in, d_out, num_experts, rank, router_experts, scale, a_programs, b_programs, w_programs,
    ROUTER_X: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr,
    RP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """``grad_A = (grad_hg * g)^T x``, ``grad_B = s (h * g)^T grad_out``, ``grad_W = d^T x`` and the input's gradient
    ``grad_x = (grad_hg * g) A_cat (+ d W with ROUTER_X)`` in one launch.

    Axis 0: programs ``[0, a)`` take A's expert tiles, ``[a, a + b)`` B's, the next ``w`` (0 or 1) the router's, the
    rest ``grad_x``'s blocks of rows; axis 1 tiles the columns of the wider input or output (a program past its own
    width does nothing). The weight gradients sum over every token in few programs; ``grad_x``'s programs fill
    the rest of the GPU in the same launch.
    """
    program, first = tl.program_id(0), tl.program_id(1) * BN
    outs = first + tl.arange(0, BN)
    if program < a_programs:
        if first < d_in:
            outer_tile(
                grad_hg_ptr, gate_ptr, x_ptr, grad_a_ptr, program * EB, outs, tokens, d_in, num_experts, rank, 1.0,
                DOT, PRECISION, BT, EB, RP, BN,
            )  # fmt: skip
    elif program < a_programs + b_programs:
        if first < d_out:
            outer_tile(
                h_ptr, gate_ptr, grad_out_ptr, grad_b_ptr, (program - a_programs) * EB, outs, tokens, d_out,
                num_experts, rank, scale, DOT, PRECISION, BT, EB, RP, BN,
            )  # fmt: skip
    elif program < a_programs + b_programs + w_programs:
        if first < d_in:
            scores_tile(d_ptr, x_ptr, grad_w_ptr, outs, tokens, d_in, router_experts, NP, BT, BN)
    elif first < d_in:
        rows = (program - a_programs - b_programs - w_programs) * BT + tl.arange(0, BT)
        up_tile(
            grad_hg_ptr, gate_ptr, a_ptr, grad_x_ptr, d_ptr, router_w_ptr, grad_x_ptr, rows, outs, tokens, d_in,
            num_experts, rank, router_experts, 1.0, False, ROUTER_X, DOT, PRECISION, BT, EB, RP, BN, NP,
        )  # fmt: skip


def gradients_of_layer(
    grad_hg, h, gate, x, grad_out, d, a_cat, b_cat, router_weight, scaling, tiles, needs, x_shape=None
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """:func:`layer_gradients`: the input's gradient (shaped ``x_shape``, default ``x``'s; with the router's share
    ``d W`` where ``d`` is given), A's, B's and the router's weight gradients, None where ``needs`` (in that order)
    says no."""
    needs_x, needs_a, needs_b, needs_w = needs
    a_programs = tiles.expert_blocks if needs_a else 0
    b_programs = tiles.expert_blocks if needs_b else 0
    (tokens, d_in), d_out = x.shape, grad_out.shape[1]
    x_programs = cdiv(tokens, BLOCK) if needs_x else 0
    if not (a_programs or b_programs or needs_w or x_programs):
        return None, None, None, None
    grad_x = x.new_empty(*(x_shape if x_shape is not None else x.shape)) if needs_x else None
    grad_a = torch.empty_like(a_cat) if needs_a else None
    grad_b = torch.empty_like(b_cat) if needs_b else None
    grad_w = torch.empty_like(router_weight) if needs_w else None
    grid = (a_programs + b_programs + int(needs_w) + x_programs, cdiv(max(d_in, d_out), BLOCK))
    layer_gradients[grid](
        grad_hg if grad_hg is not None else h, h, gate, x, grad_out, d if d is not None else gate, a_cat,
        router_weight, *(g if g is not None else gate for g in (grad_x, grad_a, grad_b, grad_w)),
        tokens, d_in, d_out, tiles.num_experts, tiles.rank, router_weight.shape[0], scaling, a_programs, b_programs,
        int(needs_w), ROUTER_X=d is not None, DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK, EB=tiles.eb,
        RP=tiles.rp, BN=BLOCK, NP=expert_tile(router_weight.shape[0]),
    )  # fmt: skip
    return grad_x, grad_a, grad_b, grad_w


@triton.jit
def grouped_gradients(
    grad_hg_ptr, h_ptr, gate_ptr, x_ptr, grad_out_ptr, dest_ptr, offsets_ptr, d_ptr, a_ptr, router_w_ptr,
    pair_x_ptr, grad_a_ptr, grad_b_ptr, grad_w_ptr, tokens, d_in, d_out, num_experts, rank, k, router_experts, scale,
    a_programs, b_programs, w_programs, ROUTER_X: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr, NE: tl.constexpr,
):  # fmt: skip
    """:func:`layer_gradients` over only the chosen experts: A's and B's from each expert's (token, expert) pairs
    (:func:`mope.kernels.grouped.grouped_outer`), the router's ``d^T x``, and the input's gradient per pair
    (:func:`mope.kernels.grouped.grouped_up_tile`, each token's first pair with the router's ``d W``; the host sums
    a token's k rows). Axis 0: one program per expert for A, then B, then the router's (0 or 1), then one per block
    of ``BP`` sorted pairs."""
    program, first = tl.program_id(0), tl.program_id(1) * BN
    cols = first + tl.arange(0, BN)
    if program < a_programs:
        if first < d_in:
            grouped_outer_tile(
                grad_hg_ptr, gate_ptr, x_ptr, dest_ptr, offsets_ptr, grad_a_ptr, program, cols, d_in, rank, k, 1.0,
                DOT, PRECISION, BT, RP, BN,
            )  # fmt: skip
    elif program < a_programs + b_programs:
        if first < d_out:
            grouped_outer_tile(
                h_ptr, gate_ptr, grad_out_ptr, dest_ptr, offsets_ptr, grad_b_ptr, program - a_programs, cols, d_out,
                rank, k, scale, DOT, PRECISION, BT, RP, BN,
            )  # fmt: skip
    elif program < a_programs + b_programs + w_programs:
        if first < d_in:
            scores_tile(d_ptr, x_ptr, grad_w_ptr, cols, tokens, d_in, router_experts, NP, BT, BN)
    elif first < d_in:
        grouped_up_tile(
            grad_hg_ptr, gate_ptr, a_ptr, dest_ptr, pair_x_ptr, offsets_ptr, d_ptr, router_w_ptr,
            program - a_programs - b_programs - w_programs, cols, d_in, rank, num_experts, k, router_experts, 1.0,
            ROUTER_X, DOT, PRECISION, BP, RP, BN, NE, NP,
        )  # fmt: skip


def chosen_expert_gradients(
    flat_out, grad_logits, grad_weights, x, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h,
    temperature: float, normalise: bool, scaling: float, state: GroupedState, needs, grad_sums=None,
) -> list[torch.Tensor | None]:  # fmt: skip
    """:func:`every_expert_gradients` over only the chosen experts (``lora_a [N, r, d_in]``, ``gate`` and ``h`` per
    sorted pair): ``s B_e^T grad`` with the gate's gradient per pair, the scores' gradient ``d``, then the input's
    gradient (with ``d W``) per pair and every weight gradient in one launch: 3 launches and a sum."""
    needs_x, needs_router, needs_a, needs_b = needs
    groups, tiles, rp = state.groups, state.tiles, state.rp
    routes = needs_x or needs_router
    grad_hg = grad_gate = d = None
    if needs_x or needs_a or routes:
        grad_hg, grad_gate = grouped.down(
            flat_out, lora_b, scaling, groups, tiles, rp, x.dtype, h if routes else None, per_pair=True
        )  # the gate's gradient [T*k]: at the chosen experts only
    per_pair = grad_gate is not None
    if grad_weights is not None:  # a loss or statistic read the gate weights too: [T, N]
        per_pair = False
        grad_gate = (
            grad_weights if grad_gate is None else grad_weights.scatter_add(1, chosen, grad_gate.view_as(chosen))
        )
    if routes and (grad_gate is not None or grad_logits is not None or grad_sums is not None):
        d = scores_gradient(
            grad_logits, grad_gate, logits, weights, chosen, router_weight, temperature, normalise,
            grad_sums=grad_sums, per_pair=per_pair,
        )  # fmt: skip
    grad_x, grad_a, grad_b, grad_router = chosen_gradients(
        grad_hg, h, gate, x, flat_out, d, lora_a, lora_b, router_weight, scaling, state,
        [needs_x, needs_a, needs_b, needs_router and d is not None],
    )  # fmt: skip
    return [grad_x, grad_router, grad_a, grad_b]


def chosen_gradients(grad_hg, h, gate, x, grad_out, d, lora_a, lora_b, router_weight, scaling, state, needs):
    """:func:`grouped_gradients`: the input's gradient (fp32, a sum over each token's k pairs, as x is here; with the
    router's ``d W`` where ``d`` is given), A's, B's and the router's, None where ``needs`` (in that order) says no."""
    groups, tiles = state.groups, state.tiles
    needs_x, needs_a, needs_b, needs_w = needs
    a_programs = tiles.num_experts if needs_a else 0
    b_programs = tiles.num_experts if needs_b else 0
    x_programs = groups.num_blocks if needs_x else 0
    if not (a_programs or b_programs or needs_w or x_programs):
        return None, None, None, None
    (tokens, d_in), d_out, k = x.shape, grad_out.shape[1], groups.shape[1]
    pair_x = x.new_empty(tokens * k, d_in, dtype=torch.float32) if needs_x else None
    grad_a = torch.empty_like(lora_a) if needs_a else None
    grad_b = torch.empty_like(lora_b) if needs_b else None
    grad_w = torch.empty_like(router_weight) if needs_w else None
    grid = (a_programs + b_programs + int(needs_w) + x_programs, cdiv(max(d_in, d_out), BLOCK))
    grouped_gradients[grid](
        grad_hg if grad_hg is not None else h, h, gate, x, grad_out, groups.dest, groups.offsets,
        d if d is not None else gate, lora_a, router_weight,
        *(g if g is not None else gate for g in (pair_x, grad_a, grad_b, grad_w)),
        tokens, d_in, d_out, tiles.num_experts, tiles.rank, k, router_weight.shape[0], scaling, a_programs,
        b_programs, int(needs_w), ROUTER_X=d is not None, DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK,
        BP=grouped.BLOCK, RP=state.rp, BN=BLOCK, NP=expert_tile(router_weight.shape[0]), NE=groups.np,
    )  # fmt: skip
    grad_x = pair_x.view(tokens, k, d_in).sum(1) if needs_x else None
    return grad_x, grad_a, grad_b, grad_w


def every_expert_gradients(
    flat_out, grad_logits, grad_weights, x, router_weight, a_cat, b_cat, logits, weights, chosen, h,
    temperature: float, normalise: bool, scaling: float, tiles: Tiles, needs, grad_sums=None, x_shape=None,
) -> list[torch.Tensor | None]:  # fmt: skip
    """The gradients of ``x``, the router's weight, ``A_cat`` and ``B_cat`` over every expert (None where ``needs``
    says no): ``s B_cat^T grad`` with the gate's gradient, the scores' gradient ``d`` (the two in one launch where
    one tile holds every expert), then the input's gradient (experts' and router's ``d W``) and every weight
    gradient in one launch: 2 or 3 launches.

    ``grad_logits`` / ``grad_weights`` ``[T, N]`` may be None (no loss read that output); ``grad_sums``:
    ``(LossSums, the gradient of its stats)`` or None (:func:`mope.kernels.router.scores_gradient`). The weight
    gradients take the shapes of ``a_cat`` and ``b_cat``, the input's ``x_shape`` (default: ``x``'s).
    """
    needs_x, needs_router, needs_a, needs_b = needs
    routes = needs_x or needs_router
    grad_hg = grad_gate = d = grad_x = None
    if routes and grad_weights is None and tiles.expert_blocks == 1:  # one tile holds every expert: d in that launch
        grad_hg, d = down_with_scores(
            flat_out, b_cat, h, logits, weights, chosen, grad_logits, grad_sums, temperature, normalise, scaling,
            tiles, x.dtype,
        )  # fmt: skip
    else:
        if needs_x or needs_a or routes:
            grad_hg, grad_gate = down(flat_out, b_cat, scaling, tiles, x.dtype, h if routes else None, weights)
        if grad_weights is not None:  # a loss or statistic read the gate weights too
            grad_gate = grad_weights if grad_gate is None else grad_gate + grad_weights
        if routes and (grad_gate is not None or grad_logits is not None or grad_sums is not None):
            d = scores_gradient(
                grad_logits, grad_gate, logits, weights, chosen, router_weight, temperature, normalise,
                grad_sums=grad_sums,
            )  # fmt: skip
    grad_x, grad_a, grad_b, grad_router = gradients_of_layer(
        grad_hg, h, weights, x, flat_out, d, a_cat, b_cat, router_weight, scaling, tiles,
        [needs_x, needs_a, needs_b, needs_router and d is not None], x_shape,
    )  # fmt: skip
    return [grad_x, grad_router, grad_a, grad_b]


def every_expert_forward(
    x, router_weight, a_cat, b_cat, base, k: int, temperature, normalise, scaling, tiles, sums=None, out_shape=None
):  # fmt: skip
    """Flat ``[T, ...]`` tensors: the output (shaped ``out_shape`` if given), the router's logits, weights and chosen
    experts, and ``h = A_cat x`` (2 launches: the router's and ``A_cat x``'s tiles in one, then the up-projection
    into the base output)."""
    logits, weights, chosen, h = routed_down(x, router_weight, a_cat, k, temperature, normalise, tiles, sums)
    return up(h, weights, b_cat, base, scaling, tiles, base.dtype, shape=out_shape), logits, weights, chosen, h


class RoutedLayer(torch.autograd.Function):
    """``base + s * B_cat (g (x) 1_r * A_cat x)`` with ``g`` the router kernel's top-k weights of ``x``.

    Returns the output; with ``routing``, then the router's logits, weights and chosen experts (for the
    losses and statistics), all in ``x``'s token shape; given a :class:`mope.losses.LossSums` (``sums``), then
    its stats, which the router's launch fills. Each output costs autograd's bookkeeping forward and
    backward, so what nothing reads is not returned.
    """

    @staticmethod
    def forward(
        ctx, x, router_weight, lora_a, lora_b, base, k: int, temperature: float, normalise: bool, scaling, sums,
        routing: bool,
    ):  # fmt: skip
        n, r, _ = lora_a.shape
        flat, flat_base = flat_rows(x), flat_rows(base)
        if grouped_pays(n, k):  # only the chosen experts (mope.kernels.grouped)
            logits, weights, chosen, counted = route(flat, router_weight, k, temperature, normalise, sums, True)
            lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
            out, experts, gate, h = grouped_forward(flat, lora_a, lora_b, weights, flat_base, chosen, scaling, counted)
            out = out.view(*base.shape)
        else:  # every expert, gate 0 where not chosen (mope.kernels.lora); the output in base's shape
            experts = Tiles.of(n, r, x.dtype, base.dtype)
            lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()  # [N, r, D]: the kernels read [N*r, D]
            operands = (flat, router_weight, lora_a, lora_b, flat_base, k, temperature, normalise, scaling, experts)
            out, logits, weights, chosen, h = every_expert_forward(*operands, sums, base.shape)
            gate = None  # the weights
        ctx.save_for_backward(flat, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h)
        ctx.settings = temperature, normalise, scaling, experts, sums, routing, x.shape
        ctx.set_materialize_grads(False)  # outputs nothing reads get no zero-filled gradient
        outputs = (out,)
        if routing:
            ctx.mark_non_differentiable(chosen)
            lead = x.shape[:-1]
            outputs += logits.view(*lead, n), weights.view(*lead, n), chosen.view(*lead, k)
        return outputs if sums is None else (*outputs, sums.stats)  # no None output: autograd wraps each

    @staticmethod
    def backward(ctx, grad_out, *grad_rest):
        x, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h = ctx.saved_tensors
        temperature, normalise, scaling, experts, sums, routing, x_shape = ctx.settings
        grad_logits, grad_weights = grad_rest[:2] if routing else (None, None)
        grad_sums = None if sums is None or grad_rest[-1] is None else (sums, grad_rest[-1])
        needs_x, needs_router, needs_a, needs_b, needs_base = ctx.needs_input_grad[:5]
        grad_weights = None if grad_weights is None else grad_weights.reshape(weights.shape)
        grad_logits = None if grad_logits is None else grad_logits.reshape(logits.shape)
        grad_base = grad_out if needs_base else None
        if isinstance(experts, Tiles) and grad_out is not None:  # every expert: 4 launches
            flat_out = flat_rows(grad_out)
            grads = every_expert_gradients(
                flat_out, grad_logits, grad_weights, x, router_weight, lora_a, lora_b, logits, weights, chosen, h,
                temperature, normalise, scaling, experts, [needs_x, needs_router, needs_a, needs_b], grad_sums, x_shape,
            )  # fmt: skip
            return *grads, grad_base, *(None,) * 6  # each in its input's shape
        if grad_out is not None:  # only the chosen experts: 3 launches, a zero fill and a sum
            flat_out = flat_rows(grad_out)
            grads = chosen_expert_gradients(
                flat_out, grad_logits, grad_weights, x, router_weight, lora_a, lora_b, logits, weights, chosen, gate,
                h, temperature, normalise, scaling, experts, [needs_x, needs_router, needs_a, needs_b], grad_sums,
            )  # fmt: skip
            return RoutedLayer.shaped(x_shape, *grads, grad_base)
        grad_x = grad_router = None  # no gradient reached the output: only the losses' reach the router
        if (needs_x or needs_router) and not (grad_weights is None and grad_logits is None and grad_sums is None):
            grad_x, grad_router = route_gradients(
                grad_logits, grad_weights, x, router_weight, logits, weights, chosen, temperature, normalise,
                [needs_x, needs_router], grad_sums,
            )  # fmt: skip
        return RoutedLayer.shaped(x_shape, grad_x, grad_router, None, None, grad_base)

    @staticmethod
    def shaped(x_shape, grad_x, grad_router, grad_a, grad_b, grad_base) -> tuple:
        """One gradient per input of :meth:`forward`, the input's in ``x_shape`` (A's and B's have theirs)."""
        return None if grad_x is None else grad_x.view(*x_shape), grad_router, grad_a, grad_b, grad_base, *(None,) * 6


# torch.compile: the every-expert form as custom ops (why custom ops: mope.kernels.lora) -------------------


@torch.library.custom_op("mope::routed_layer", mutates_args=())
def routed_layer_op(
    x: torch.Tensor, router_weight: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, base: torch.Tensor,
    k: int, temperature: float, normalise: bool, scaling: float, num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`every_expert_forward`: the output, logits, weights, chosen experts and ``h`` for the backward."""
    tiles = Tiles.of(num_experts, a_cat.shape[0] // num_experts, x.dtype, base.dtype)
    return every_expert_forward(x, router_weight, a_cat, b_cat, base, k, temperature, normalise, scaling, tiles)


@routed_layer_op.register_fake
def routed_layer_shapes(x, router_weight, a_cat, b_cat, base, k, temperature, normalise, scaling, num_experts):
    logits = x.new_empty(x.shape[0], router_weight.shape[0])
    chosen = x.new_empty(x.shape[0], k, dtype=torch.long)
    return base.new_empty(base.shape), logits, torch.empty_like(logits), chosen, x.new_empty(x.shape[0], a_cat.shape[0])


@torch.library.custom_op("mope::routed_layer_backward", mutates_args=())
def routed_layer_backward_op(
    grad_out: torch.Tensor, grad_logits: torch.Tensor | None, grad_weights: torch.Tensor | None, x: torch.Tensor,
    router_weight: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, logits: torch.Tensor,
    weights: torch.Tensor, chosen: torch.Tensor, h: torch.Tensor, temperature: float, normalise: bool,
    scaling: float, num_experts: int, needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """:func:`every_expert_gradients` as an op: an empty tensor where a gradient is not needed."""
    tiles = Tiles.of(num_experts, a_cat.shape[0] // num_experts, x.dtype, grad_out.dtype)
    grads = every_expert_gradients(
        grad_out, grad_logits, grad_weights, x, router_weight, a_cat, b_cat, logits, weights, chosen, h,
        temperature, normalise, scaling, tiles, needs,
    )  # fmt: skip
    return [x.new_empty(0) if g is None else g for g in grads]


@routed_layer_backward_op.register_fake
def routed_layer_backward_shapes(grad_out, grad_logits, grad_weights, x, router_weight, a_cat, b_cat, *rest):
    needs = rest[-1]
    shaped = (x, router_weight, a_cat, b_cat)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(shaped, needs, strict=True)]


def save_for_layer_backward(ctx, inputs, output) -> None:
    x, router_weight, a_cat, b_cat, _, _, temperature, normalise, scaling, num_experts = inputs
    ctx.save_for_backward(x, router_weight, a_cat, b_cat, *output[1:])
    ctx.settings = temperature, normalise, scaling, num_experts
    ctx.base_dtype = inputs[4].dtype


def routed_layer_op_backward(ctx, grad_out, grad_logits, grad_weights, grad_chosen, grad_h):
    x, router_weight, a_cat, b_cat, logits, weights, chosen, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grad_base = grad_out if ctx.needs_input_grad[4] else None
    if grad_out is None:  # only the losses' gradients: the experts' part is zero (in the base output's dtype)
        grad_out = x.new_zeros(x.shape[0], b_cat.shape[1], dtype=ctx.base_dtype)
    grads = routed_layer_backward_op(
        grad_out.contiguous(), grad_logits, grad_weights, x, router_weight, a_cat, b_cat, logits, weights, chosen,
        h, *ctx.settings, needs,
    )  # fmt: skip
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), grad_base, *(None,) * 5


routed_layer_op.register_autograd(routed_layer_op_backward, setup_context=save_for_layer_backward)


def routed_layer(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_out: torch.Tensor,
    k: int,
    temperature: float,
    normalise: bool,
    scaling: float,
    sums: LossSums | None = None,
    routing: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The layer's output, the router's logits and gate weights ``[..., N]``, chosen experts ``[..., k]``, and the
    stats of ``sums`` (the router losses' sums, computed in the router's launch; None without ``sums``, and
    under ``torch.compile``, whose op leaves the losses to the logits).

    ``x`` fp32 ``[..., d_in]`` with at least one token; ``normalise``: the kept weights sum to 1
    (else Switch's full-softmax values). ``routing=False``: nothing reads the logits, weights and chosen
    experts, which are then None in eager mode (the compiled op returns them anyway).
    """
    weight = router_weight.float().contiguous()
    if not torch.compiler.is_compiling():
        outputs = RoutedLayer.apply(
            x, weight, lora_A, lora_B, base_out, k, float(temperature), normalise, scaling, sums, routing
        )
        if not routing:
            return outputs[0], None, None, None, outputs[1] if sums is not None else None
        return outputs if sums is not None else (*outputs, None)
    n, r, d_in = lora_A.shape  # compiled: every expert (MoPELayer.fuses leaves the grouped case to the modules)
    flat, base = x.reshape(-1, d_in).contiguous(), base_out.reshape(-1, base_out.shape[-1]).contiguous()
    a_cat, b_cat = lora_A.reshape(n * r, d_in), lora_B.reshape(n * r, -1)
    out, logits, weights, chosen, _ = routed_layer_op(
        flat, weight, a_cat, b_cat, base, k, float(temperature), normalise, scaling, n
    )
    lead = x.shape[:-1]
    return out.view(*base_out.shape), logits.view(*lead, n), weights.view(*lead, n), chosen.view(*lead, k), None
