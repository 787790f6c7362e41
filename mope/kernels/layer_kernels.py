"""The Triton kernels of the fused layer (:mod:`mope.kernels.layer`) and their launchers: the router's and
``A_cat x``'s tiles in one launch (:func:`route_down`); the gate's and the scores' gradients in one where one tile
holds every expert (:func:`down_scores`); the input's gradient with every weight gradient in one, over every
expert (:func:`layer_gradients`) or only the chosen (:func:`grouped_gradients`). Their device functions are the
expert and router kernels' own (:mod:`mope.kernels.lora`, :mod:`mope.kernels.grouped`, :mod:`mope.kernels.router`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouped
from .grid import cdiv, launch_options
from .grouped import grouped_outer_tile, grouped_up_tile
from .lora import BLOCK, Tiles, down_product, down_tile, gate_gradient, outer_tile, router_chunk, up_tile
from .router import expert_tile, loss_gradients, route_tile, scores_gradient_tile, scores_tile


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
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
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
        DOT=tiles.dot, PRECISION=tiles.precision, BM=BLOCK, EB=tiles.eb, RP=tiles.rp, BK=BLOCK, **launch_options(),
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
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
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
        BK=BLOCK, **launch_options(),
    )  # fmt: skip
    return grad_hg, d


@triton.jit
def layer_gradients(
    grad_hg_ptr, h_ptr, gate_ptr, x_ptr, grad_out_ptr, d_ptr, a_ptr, router_w_ptr, grad_x_ptr, grad_a_ptr, grad_b_ptr,
    grad_w_ptr, tokens, d_in, d_out, num_experts, rank, router_experts, scale, a_programs, b_programs, w_programs,
    ROUTER_X: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr,
    RP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
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
        rows = (program - a_programs - b_programs - w_programs).to(tl.int64) * BT + tl.arange(0, BT)
        up_tile(
            grad_hg_ptr, gate_ptr, a_ptr, grad_x_ptr, d_ptr, router_w_ptr, grad_x_ptr, rows, outs, tokens, d_in,
            num_experts, rank, router_experts, 1.0, False, ROUTER_X, DOT, PRECISION, BT, EB, RP, BN, NR,
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
        router_weight, grad_x if needs_x else gate, grad_a if needs_a else gate, grad_b if needs_b else gate,
        grad_w if needs_w else gate,  # gate: a pointer for the outputs not written (no generator: host work)
        tokens, d_in, d_out, tiles.num_experts, tiles.rank, router_weight.shape[0], scaling, a_programs, b_programs,
        int(needs_w), ROUTER_X=d is not None, DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK, EB=tiles.eb,
        RP=tiles.rp, BN=BLOCK, NP=expert_tile(router_weight.shape[0]), NR=router_chunk(router_weight.shape[0]),
        **launch_options(),
    )  # fmt: skip
    return grad_x, grad_a, grad_b, grad_w


@triton.jit
def grouped_gradients(
    grad_hg_ptr, h_ptr, gate_ptr, x_ptr, grad_out_ptr, dest_ptr, offsets_ptr, d_ptr, a_ptr, router_w_ptr,
    pair_x_ptr, grad_a_ptr, grad_b_ptr, grad_w_ptr, tokens, d_in, d_out, num_experts, rank, k, router_experts, scale,
    a_programs, b_programs, w_programs, ROUTER_X: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr, NE: tl.constexpr,
    NR: tl.constexpr,
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
            ROUTER_X, DOT, PRECISION, BP, RP, BN, NE, NR,
        )  # fmt: skip


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
        pair_x if needs_x else gate, grad_a if needs_a else gate, grad_b if needs_b else gate,
        grad_w if needs_w else gate,
        tokens, d_in, d_out, tiles.num_experts, tiles.rank, k, router_weight.shape[0], scaling, a_programs,
        b_programs, int(needs_w), ROUTER_X=d is not None, DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK,
        BP=grouped.BLOCK, RP=state.rp, BN=BLOCK, NP=expert_tile(router_weight.shape[0]), NE=groups.np,
        NR=router_chunk(router_weight.shape[0]), **launch_options(),
    )  # fmt: skip
    grad_x = pair_x.view(tokens, k, d_in).sum(1) if needs_x else None
    return grad_x, grad_a, grad_b, grad_w
