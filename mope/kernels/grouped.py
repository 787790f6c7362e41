"""Routed LoRA over the chosen experts only, grouped by expert (ScatterMoE-style), in Triton.

The masked kernels (:mod:`mope.kernels.lora`) compute all N experts for every token; with N/k
large most of that work is multiplied by a zero gate. Here the T*k (token, expert) pairs of the
gate's ``chosen`` list are sorted by expert with their gate weights (a stable counting sort, no host
sync: ``count_pairs`` then ``place_pairs``, :func:`sort_pairs`; the fused layer's router counts in its own
launch, so its sort is one), and each product is one kernel over the groups: a program takes a block of
one expert's pairs, gathers their rows by token index inside the kernel (no copy of the selected rows)
and multiplies by that expert's factors. Forward: ``grouped_pairs`` (``h = A_e x[token]``, then
``s * gate * h B_e`` written at the pair's token-major row, each token's first row with the base output
added), then the k rows of each token are summed (one torch op). Backward: ``grouped_down``
(``s * grad[token] B_e^T``, with the gate's gradient written at each pair's token and expert, or per pair),
``grouped_up`` for the input's, and ``grouped_outer`` for A's and B's (a loop over each expert's own pairs);
the fused layer's backward merges these (:func:`mope.kernels.layer.chosen_expert_gradients`).

Blocks: expert e's pairs fill ``ceil(count_e / BLOCK)`` blocks; the grid has ``ceil(T*k / BLOCK) + N``
programs (a bound known on the host), the ones past the last block do nothing. Each program finds
its expert and block from the experts' offsets (:func:`pair_block`).

Used by ``dispatch='triton'`` (:func:`mope.kernels.lora.routed_lora`) where the gate lists its
chosen experts and ``N / k >= GROUPED_MIN_EXPERTS_PER_ACTIVE`` (8, untuned: the CPU's sparse
threshold, :func:`mope.dispatch.auto_dispatch`), eager or under ``torch.compile`` (as custom ops);
the masked kernels elsewhere.
Unlike the masked form it gives the gate weights a gradient only at the chosen experts (the
router's gradient is the same: its weights there are zero with zero derivative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .grid import cdiv, first_order_only, flat_rows, launch_options, next_power_of_2, on_inputs_device
from .lora import MIN_DOT, Tiles, router_share

BLOCK = 64  # pairs per program, and the columns per step


@triton.jit
def pair_block(offsets_ptr, num_experts, block, BM: tl.constexpr, NP: tl.constexpr):
    """The expert of the ``block``-th block of (sorted) pairs and its pairs, found from the experts' offsets.

    Expert e's pairs fill ``ceil(count_e / BM)`` blocks, in expert order; past the last block, no pair.
    """
    experts = tl.arange(0, NP)
    experts_ok = experts < num_experts
    starts = tl.load(offsets_ptr + experts, mask=experts_ok, other=0)
    ends = tl.load(offsets_ptr + experts + 1, mask=experts_ok, other=0)
    blocks = (ends - starts + BM - 1) // BM
    block_ends = tl.cumsum(blocks, 0)
    expert = tl.sum((block_ends <= block).to(tl.int32), 0)  # NP past the last block: no expert matches below
    mine = experts == expert
    first = tl.sum(tl.where(mine, block_ends - blocks, 0), 0)
    pairs = tl.sum(tl.where(mine, starts, 0), 0) + (block - first) * BM + tl.arange(0, BM)
    pairs_ok = pairs < tl.sum(tl.where(mine, ends, 0), 0)
    return tl.minimum(expert, num_experts - 1), pairs, pairs_ok


@triton.jit
def pair_down(src_ptr, w_ptr, tokens, pairs_ok, expert, width, rank, DOT: tl.constexpr, PRECISION: tl.constexpr,
              BM: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """``src[token] @ w[e]^T`` ``[BM, RP]`` in fp32 (``w [N, r, width]``) for one block of expert e's pairs."""
    ranks = tl.arange(0, RP)
    ranks_ok = ranks < rank
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, width, BK):
        ks = k0 + tl.arange(0, BK)
        ks_ok = ks < width
        x = tl.load(src_ptr + tokens[:, None] * width + ks[None, :], mask=pairs_ok[:, None] & ks_ok[None, :], other=0.0)
        w_rows = w_ptr + (expert * rank + ranks[None, :]) * width + ks[:, None]
        w = tl.load(w_rows, mask=ranks_ok[None, :] & ks_ok[:, None], other=0.0)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def grouped_down(
    src_ptr, dest_ptr, w_ptr, out_ptr, h_ptr, gate_grad_ptr, offsets_ptr, width, rank, num_experts, k, scale,
    GATE_GRAD: tl.constexpr, PER_PAIR: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
    RP: tl.constexpr, BK: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """``out[p] = scale * src[token] @ w[e]^T`` (``w [N, r, width]``) for one block of expert e's pairs.

    With ``GATE_GRAD`` also the gate's gradient ``sum_i out[p, i] * h[p, i]``, at ``[token, e]`` of a ``[T, N]``
    tensor, or with ``PER_PAIR`` at the pair's token-major index (``[T, k]``: nothing to fill where not chosen).
    """
    expert, pairs, pairs_ok = pair_block(offsets_ptr, num_experts, tl.program_id(0), BM, NP)
    dest = tl.load(dest_ptr + pairs, mask=pairs_ok, other=0)
    tokens = dest // k
    acc = pair_down(src_ptr, w_ptr, tokens, pairs_ok, expert, width, rank, DOT, PRECISION, BM, RP, BK) * scale
    ranks = tl.arange(0, RP)
    tile = pairs[:, None] * rank + ranks[None, :]
    tile_ok = pairs_ok[:, None] & (ranks < rank)[None, :]
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    if GATE_GRAD:
        h = tl.load(h_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        gate_grad = tl.sum(acc * h, axis=1).to(gate_grad_ptr.dtype.element_ty)
        at = dest if PER_PAIR else tokens * num_experts + expert
        tl.store(gate_grad_ptr + at, gate_grad, mask=pairs_ok)


@triton.jit
def grouped_pairs(
    x_ptr, a_ptr, b_ptr, base_ptr, gate_ptr, dest_ptr, offsets_ptr, h_ptr, out_ptr, d_in, d_out, rank, num_experts,
    k, scale, span, DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """The forward for one block of expert e's pairs: ``h = A_e x[token]`` (stored by the first program of axis 1),
    then ``out[dest] = scale * gate * h @ B_e`` on ``span`` columns (axis 1), plus the base output's row on each
    token's first pair (slot 0 of its k), so that a token's k rows sum to the layer's output.

    ``h`` is rounded to its stored dtype before the up-projection, as the backward reads it.
    """
    expert, pairs, pairs_ok = pair_block(offsets_ptr, num_experts, tl.program_id(0), BM, NP)
    dest = tl.load(dest_ptr + pairs, mask=pairs_ok, other=0)
    tokens = dest // k
    h = pair_down(x_ptr, a_ptr, tokens, pairs_ok, expert, d_in, rank, DOT, PRECISION, BM, RP, BK)
    h = h.to(h_ptr.dtype.element_ty)
    ranks = tl.arange(0, RP)
    ranks_ok = ranks < rank
    if tl.program_id(1) == 0:
        tl.store(h_ptr + pairs[:, None] * rank + ranks[None, :], h, mask=pairs_ok[:, None] & ranks_ok[None, :])
    gate = tl.load(gate_ptr + pairs, mask=pairs_ok, other=0.0).to(tl.float32)
    hg = (h.to(tl.float32) * gate[:, None]).to(DOT)
    firsts = pairs_ok & (dest % k == 0)
    first = tl.program_id(1) * span
    for n0 in range(first, tl.minimum(first + span, d_out), BN):
        cols = n0 + tl.arange(0, BN)
        cols_ok = cols < d_out
        w = tl.load(
            b_ptr + (expert * rank + ranks[:, None]) * d_out + cols[None, :], mask=ranks_ok[:, None] & cols_ok[None, :],
            other=0.0,
        )  # fmt: skip
        acc = tl.dot(hg, w.to(DOT), input_precision=PRECISION) * scale
        base = tl.load(base_ptr + tokens[:, None] * d_out + cols[None, :], mask=firsts[:, None] & cols_ok[None, :],
                       other=0.0)  # fmt: skip
        acc += base.to(tl.float32)
        tl.store(out_ptr + dest[:, None] * d_out + cols[None, :], acc, mask=pairs_ok[:, None] & cols_ok[None, :])


@triton.jit
def gated_rows(p_ptr, gate_ptr, pairs, pairs_ok, rank, RP: tl.constexpr):
    """``p[pairs, :r] * gate[pairs]`` in fp32, and the rank indices and bounds."""
    ranks = tl.arange(0, RP)
    ranks_ok = ranks < rank
    p = tl.load(p_ptr + pairs[:, None] * rank + ranks[None, :], mask=pairs_ok[:, None] & ranks_ok[None, :], other=0.0)
    gate = tl.load(gate_ptr + pairs, mask=pairs_ok, other=0.0).to(tl.float32)
    return p.to(tl.float32) * gate[:, None], ranks, ranks_ok


@triton.jit
def grouped_up(
    p_ptr, gate_ptr, w_ptr, dest_ptr, out_ptr, offsets_ptr, width, rank, num_experts, scale,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr,
    NP: tl.constexpr,
):  # fmt: skip
    """``out[dest[p]] = scale * gate[p] * p[p] @ w[e]`` (``w [N, r, width]``) for one block of pairs and columns."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    # NR = 16: no router here (a kernel reads no Python global such as MIN_DOT)
    grouped_up_tile(
        p_ptr, gate_ptr, w_ptr, dest_ptr, out_ptr, offsets_ptr, out_ptr, out_ptr, tl.program_id(0), cols, width,
        rank, num_experts, 1, 1, scale, False, DOT, PRECISION, BM, RP, BN, NP, 16,
    )  # fmt: skip


@triton.jit
def grouped_up_tile(
    p_ptr, gate_ptr, w_ptr, dest_ptr, out_ptr, offsets_ptr, d_ptr, router_w_ptr, block, cols, width, rank,
    num_experts, k, router_experts, scale, ROUTER: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
):  # fmt: skip
    """:func:`grouped_up` for the ``block``-th block of pairs and the columns ``cols``; with ``ROUTER`` each token's
    first pair (slot 0 of its k) also gets ``d[token] @ router_w`` (``[N', width]``, IEEE fp32, ``NR`` router experts
    a step: :func:`mope.kernels.lora.router_share`), so the sum over a token's k rows holds the router's share once."""
    expert, pairs, pairs_ok = pair_block(offsets_ptr, num_experts, block, BM, NP)
    cols_ok = cols < width
    pg, ranks, ranks_ok = gated_rows(p_ptr, gate_ptr, pairs, pairs_ok, rank, RP)
    w_rows = w_ptr + (expert * rank + ranks[:, None]) * width + cols[None, :]
    w = tl.load(w_rows, mask=ranks_ok[:, None] & cols_ok[None, :], other=0.0)
    acc = tl.dot(pg.to(DOT), w.to(DOT), input_precision=PRECISION) * scale
    dest = tl.load(dest_ptr + pairs, mask=pairs_ok, other=0)
    if ROUTER:
        firsts = pairs_ok & (dest % k == 0)
        acc = router_share(acc, d_ptr, router_w_ptr, dest // k, firsts, cols, cols_ok, router_experts, width, NR)
    tl.store(out_ptr + dest[:, None] * width + cols[None, :], acc, mask=pairs_ok[:, None] & cols_ok[None, :])


@triton.jit
def grouped_outer(
    p_ptr, gate_ptr, src_ptr, dest_ptr, offsets_ptr, out_ptr, width, rank, k, scale,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """``out[e] = scale * sum over e's pairs of (gate * p)^T src[token]`` ``[r, width]``: a factor's gradient."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    grouped_outer_tile(
        p_ptr, gate_ptr, src_ptr, dest_ptr, offsets_ptr, out_ptr, tl.program_id(0), cols, width, rank, k, scale,
        DOT, PRECISION, BT, RP, BN,
    )  # fmt: skip


@triton.jit
def grouped_outer_tile(
    p_ptr, gate_ptr, src_ptr, dest_ptr, offsets_ptr, out_ptr, expert, cols, width, rank, k, scale,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """:func:`grouped_outer` for ``expert`` and the columns ``cols``."""
    cols_ok = cols < width
    start, end = tl.load(offsets_ptr + expert), tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((RP, BN), dtype=tl.float32)
    ranks = tl.arange(0, RP)
    ranks_ok = ranks < rank
    for t0 in range(start, end, BT):
        pairs = t0 + tl.arange(0, BT)
        pairs_ok = pairs < end
        pg, _, _ = gated_rows(p_ptr, gate_ptr, pairs, pairs_ok, rank, RP)
        tokens = tl.load(dest_ptr + pairs, mask=pairs_ok, other=0) // k
        y = tl.load(
            src_ptr + tokens[:, None] * width + cols[None, :], mask=pairs_ok[:, None] & cols_ok[None, :], other=0.0
        )
        acc = tl.dot(tl.trans(pg).to(DOT), y.to(DOT), acc, input_precision=PRECISION)
    acc = acc * scale
    rows = out_ptr + (expert * rank + ranks[:, None]) * width + cols[None, :]
    tl.store(rows, acc.to(out_ptr.dtype.element_ty), mask=ranks_ok[:, None] & cols_ok[None, :])


@triton.jit
def count_pairs(chosen_ptr, counts_ptr, pairs, num_experts, BP: tl.constexpr, NP: tl.constexpr):
    """``counts[b, e]`` (``[blocks, N]``): how many of the b-th block of ``BP`` (token-major) pairs chose expert e."""
    block = tl.program_id(0)
    index = block * BP + tl.arange(0, BP)
    expert = tl.load(chosen_ptr + index, mask=index < pairs, other=-1)  # -1: no expert
    experts = tl.arange(0, NP)
    chose = (expert[:, None] == experts[None, :]).to(tl.int32)
    # an expert out of [0, N) is counted nowhere (only real experts' counts are stored), as place_pairs drops it
    tl.store(counts_ptr + block * num_experts + experts, tl.sum(chose, axis=0), mask=experts < num_experts)


@triton.jit
def place_pairs(
    chosen_ptr, counts_ptr, running_ptr, weights_ptr, offsets_ptr, dest_ptr, gate_ptr, pairs, per_block,
    count_blocks, num_experts, k, RUNNING: tl.constexpr, BP: tl.constexpr, NP: tl.constexpr, BB: tl.constexpr,
):  # fmt: skip
    """A stable counting sort of the pairs by expert: each pair's token-major index ``dest`` and gate weight
    ``weights[token, e]`` go to ``offsets[e]`` + the pairs of e before it; the first program writes the offsets.

    ``counts [blocks, N]``: how many of each block of ``per_block`` pairs (``BP``: rounded up to a power of two)
    chose each expert (:func:`count_pairs`, or the router's launch). Each program sums the blocks' counts itself,
    ``BB`` blocks at a time: the total and those before its own block; with ``RUNNING`` (many blocks, where
    that scan's reads grow as their square) it reads them from ``running``, the counts summed down the blocks.
    """
    block = tl.program_id(0)
    experts = tl.arange(0, NP)
    experts_ok = experts < num_experts
    if RUNNING:
        total = tl.load(running_ptr + (count_blocks - 1) * num_experts + experts, mask=experts_ok, other=0)
        row = block * num_experts + experts
        own = tl.load(counts_ptr + row, mask=experts_ok, other=0)
        before = tl.load(running_ptr + row, mask=experts_ok, other=0) - own  # the running sums include its own
    else:
        total = tl.zeros((NP,), dtype=tl.int32)
        before = tl.zeros((NP,), dtype=tl.int32)
        for b0 in range(0, count_blocks, BB):
            blocks = b0 + tl.arange(0, BB)
            counts = tl.load(
                counts_ptr + blocks[:, None] * num_experts + experts[None, :],
                mask=(blocks < count_blocks)[:, None] & experts_ok[None, :], other=0,
            )  # fmt: skip
            total += tl.sum(counts, axis=0)
            before += tl.sum(tl.where((blocks < block)[:, None], counts, 0), axis=0)
    ends = tl.cumsum(total, 0)
    first = (block + 0 * experts) == 0  # a vector: a scalar bool in a mask is refused by Triton 3.9's interpreter
    tl.store(offsets_ptr + experts + 1, ends.to(tl.int64), mask=experts_ok & first)
    tl.store(offsets_ptr + experts, tl.zeros((NP,), dtype=tl.int64), mask=(experts == 0) & first)
    lanes = tl.arange(0, BP)
    index = block * per_block + lanes
    index_ok = (lanes < per_block) & (index < pairs)
    expert = tl.load(chosen_ptr + index, mask=index_ok, other=-1)
    # a pair whose expert is out of range (never the router's) is dropped: its position would be out of bounds
    index_ok = index_ok & (expert >= 0) & (expert < num_experts)
    chose = (expert[:, None] == experts[None, :]).to(tl.int32)
    earlier = tl.sum(tl.cumsum(chose, axis=0) * chose, axis=1) - 1  # the pairs of its expert before it here
    position = tl.sum(chose * (ends - total + before)[None, :], axis=1) + earlier
    tl.store(dest_ptr + position, index.to(tl.int64), mask=index_ok)
    gate = tl.load(weights_ptr + (index // k) * num_experts + expert, mask=index_ok, other=0.0)
    tl.store(gate_ptr + position, gate, mask=index_ok)


SORT_TILE = 8192  # pairs (or blocks) x experts (padded) a program of the sort kernels holds at once
# output columns per program of grouped_pairs: each program computes its block's h = A_e x again, reading its
# pairs' rows of x, so more spans mean more parallel programs but x read once per span (untuned; one span up to
# 2048 columns, as the projections of a 1024-wide model)
COLUMN_SPAN = 2048
SCAN_BLOCKS = 256  # more blocks of counts: place_pairs reads their running sums (one torch cumsum), not each scan


def counts_fit(num_experts: int, k: int, tokens_per_block: int) -> bool:
    """Whether :func:`place_pairs` can take counts per block of ``tokens_per_block`` tokens (as the router's launch
    fills them): a program then holds a block's pairs by every expert, both padded to powers of two, which stays
    within ``SORT_TILE`` as :func:`count_pairs`' blocks do (at top-2 up to N = 64 with the router's 32 tokens)."""
    return next_power_of_2(tokens_per_block * k) * next_power_of_2(num_experts) <= SORT_TILE


class Groups:
    """The pairs of ``chosen [T, k]`` sorted by expert, and their gate weights (see :func:`sort_pairs`).

    ``dest [T*k]``: each sorted pair's token-major index (its token is ``dest // k``); ``offsets [N + 1]``:
    where each expert's pairs start; ``gate [T*k]``: ``weights [T, N]`` at each pair.
    """

    def __init__(self, dest: torch.Tensor, offsets: torch.Tensor, gate: torch.Tensor, tokens: int, k: int) -> None:
        self.dest, self.offsets, self.gate = dest, offsets, gate
        num_experts = offsets.shape[0] - 1
        self.shape = (tokens, k, num_experts)
        self.np = next_power_of_2(num_experts)
        self.num_blocks = cdiv(tokens * k, BLOCK) + num_experts  # at least sum(ceil(count_e / BLOCK)), known here


def sort_pairs(chosen: torch.Tensor, weights: torch.Tensor, counted=None) -> Groups:
    """The pairs of ``chosen [T, k]`` sorted by expert with their gate weights, on the device with no host sync:
    :func:`count_pairs` then :func:`place_pairs`, or only the latter given ``counted``, ``(counts [blocks, N]
    (int32), pairs per block)``, as the router's launch fills them."""
    tokens, k = chosen.shape
    num_experts, pairs = weights.shape[1], chosen.numel()
    padded = next_power_of_2(num_experts)
    if counted is None:
        per_block = max(16, SORT_TILE // padded)
        counts = chosen.new_empty(cdiv(pairs, per_block), num_experts, dtype=torch.int32)
        count_pairs[(counts.shape[0],)](chosen, counts, pairs, num_experts, BP=per_block, NP=padded, **launch_options())
    else:
        counts, per_block = counted
    offsets, dest, gate = chosen.new_empty(num_experts + 1), chosen.new_empty(pairs), weights.new_empty(pairs)
    count_blocks = counts.shape[0]
    running = count_blocks > SCAN_BLOCKS
    place_pairs[(count_blocks,)](
        chosen, counts, counts.cumsum(0, dtype=torch.int32) if running else counts, weights, offsets, dest, gate,
        pairs, per_block, count_blocks, num_experts, k, RUNNING=running, BP=next_power_of_2(per_block), NP=padded,
        BB=max(1, SORT_TILE // padded), **launch_options(),
    )  # fmt: skip
    return Groups(dest, offsets, gate, tokens, k)


def down(src, w, scale: float, groups: Groups, tiles: Tiles, rp: int, out_dtype, h=None, per_pair=False):
    """``scale * src[token] @ w[e]^T`` ``[P, r]`` in sorted pair order; with ``h``, also the gate's gradient in the
    gate's dtype: ``[T, N]`` (zero where not chosen), or with ``per_pair`` ``[T*k]`` at each token-major pair."""
    tokens, k, num_experts = groups.shape
    out = src.new_empty(tokens * k, tiles.rank, dtype=out_dtype)
    gate_grad = None
    if h is not None:
        gate_grad = groups.gate.new_empty(tokens * k) if per_pair else groups.gate.new_zeros(tokens, num_experts)
    grouped_down[(groups.num_blocks,)](
        src, groups.dest, w, out, h if h is not None else out, gate_grad if gate_grad is not None else out,
        groups.offsets, src.shape[1], tiles.rank, num_experts, k, scale, GATE_GRAD=h is not None,
        PER_PAIR=per_pair, DOT=tiles.dot, PRECISION=tiles.precision, BM=BLOCK, RP=rp, BK=BLOCK, NP=groups.np,
        **launch_options(),
    )  # fmt: skip
    return out, gate_grad


def up_summed(p, gate, w, scale: float, groups: Groups, tiles: Tiles, rp: int) -> torch.Tensor:
    """``sum over a token's k pairs of scale * gate * p @ w[e]`` ``[T, width]`` in fp32."""
    tokens, k, num_experts = groups.shape
    width = w.shape[2]
    out = p.new_empty(tokens * k, width, dtype=torch.float32)
    grouped_up[(groups.num_blocks, cdiv(width, BLOCK))](
        p, gate, w, groups.dest, out, groups.offsets, width, tiles.rank, num_experts, scale,
        DOT=tiles.dot, PRECISION=tiles.precision, BM=BLOCK, RP=rp, BN=BLOCK, NP=groups.np, **launch_options(),
    )  # fmt: skip
    return out.view(tokens, k, width).sum(1)


def outer(p, gate, src, scale: float, groups: Groups, tiles: Tiles, rp: int, out_dtype) -> torch.Tensor:
    """``scale * sum over e's pairs of (gate * p)^T src[token]`` ``[N, r, width]``."""
    width = src.shape[1]
    out = src.new_empty(tiles.num_experts, tiles.rank, width, dtype=out_dtype)
    grouped_outer[(tiles.num_experts, cdiv(width, BLOCK))](
        p, gate, src, groups.dest, groups.offsets, out, width, tiles.rank, groups.shape[1], scale,
        DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK, RP=rp, BN=BLOCK, **launch_options(),
    )  # fmt: skip
    return out


@dataclass
class GroupedState:
    """What the grouped experts' backward needs besides tensors (saved apart, for autograd's checks)."""

    groups: Groups
    tiles: Tiles
    rp: int


def grouped_forward(x, lora_a, lora_b, weights, base, chosen, scaling: float, counted=None):
    """Flat ``x [T, d_in]``, ``weights [T, N]``, ``base [T, d_out]``, ``chosen [T, k]``: the output in base's dtype,
    the state, and per sorted pair the gate weight ``[P]`` and ``h = A_e x[token]`` ``[P, r]`` for the backward.

    The sort (:func:`sort_pairs`, given the router's ``counted``: one launch), then :func:`grouped_pairs`: each
    pair's row, base on a token's first; the k rows of a token are then summed (one torch op, and a cast).
    """
    (num_experts, rank, d_in), d_out = lora_a.shape, lora_b.shape[2]
    groups = sort_pairs(chosen, weights, counted)
    tokens, k, _ = groups.shape
    tiles = Tiles.of(num_experts, rank, x.dtype, base.dtype)
    rp = max(MIN_DOT, tiles.rp)
    h = x.new_empty(tokens * k, rank)
    rows = x.new_empty(tokens * k, d_out, dtype=torch.float32)
    grouped_pairs[(groups.num_blocks, cdiv(d_out, COLUMN_SPAN))](
        x, lora_a, lora_b, base, groups.gate, groups.dest, groups.offsets, h, rows, d_in, d_out, rank, num_experts, k,
        scaling, COLUMN_SPAN, DOT=tiles.dot, PRECISION=tiles.precision, BM=BLOCK, RP=rp, BK=BLOCK, BN=BLOCK,
        NP=groups.np, **launch_options(),
    )  # fmt: skip
    out = rows.view(tokens, k, d_out).sum(1) if k > 1 else rows
    return out.to(base.dtype), GroupedState(groups, tiles, rp), groups.gate, h


def grouped_gradients(grad_out, x, lora_a, lora_b, gate, h, state: GroupedState, s: float, needs):
    """The gradients of flat ``x``, ``lora_A``, ``lora_B`` and the weights ``[T, N]`` (nonzero at the chosen only)."""
    groups, tiles, rp = state.groups, state.tiles, state.rp
    grad_x = grad_a = grad_b = grad_weights = None
    if needs[0] or needs[1] or needs[3]:
        grad_hg, grad_gate = down(grad_out, lora_b, s, groups, tiles, rp, x.dtype, h if needs[3] else None)
        if needs[0]:
            grad_x = up_summed(grad_hg, gate, lora_a, 1.0, groups, tiles, rp).to(x.dtype)
        if needs[1]:
            grad_a = outer(grad_hg, gate, x, 1.0, groups, tiles, rp, lora_a.dtype)
        if needs[3]:
            grad_weights = grad_gate
    if needs[2]:
        grad_b = outer(h, gate, grad_out, s, groups, tiles, rp, lora_b.dtype)
    return [grad_x, grad_a, grad_b, grad_weights]


class GroupedLoRA(torch.autograd.Function):
    """``base + s * sum over chosen e of gate[t, e] * B_e^T A_e x[t]`` for tensors of any token shape.

    Flattened inside the Function, where autograd does not track the views (see ``RoutedLoRA``).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weights, base, chosen, scaling: float):
        n = lora_a.shape[0]
        flat_x, lora_a, lora_b = flat_rows(x), lora_a.contiguous(), lora_b.contiguous()
        flat_base = flat_rows(base)  # the kernels read contiguous rows
        out, state, gate, h = grouped_forward(
            flat_x, lora_a, lora_b, weights.reshape(-1, n).contiguous(), flat_base,
            chosen.reshape(-1, chosen.shape[-1]).contiguous(), scaling,
        )  # fmt: skip
        ctx.save_for_backward(flat_x, lora_a, lora_b, gate, h)
        ctx.state, ctx.scaling, ctx.shapes = state, scaling, (x.shape, weights.shape)
        return out.view(*base.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, lora_a, lora_b, gate, h = ctx.saved_tensors
        flat_out = flat_rows(grad_out)
        needs = ctx.needs_input_grad
        grads = grouped_gradients(flat_out, x, lora_a, lora_b, gate, h, ctx.state, ctx.scaling, needs[:4])
        x_shape, weights_shape = ctx.shapes
        grad_x, grad_a, grad_b, grad_weights = grads
        return (
            None if grad_x is None else grad_x.view(*x_shape),
            grad_a,
            grad_b,
            None if grad_weights is None else grad_weights.view(*weights_shape),
            grad_out if needs[4] else None,
            None,
            None,
        )


# Under torch.compile: the same forward and backward as custom ops (see mope.kernels.lora for why custom ops).
# The forward returns what the backward needs besides its inputs: the gate weights and h per sorted pair, and
# the sort itself (dest, offsets), which the backward rebuilds its Groups from.


@torch.library.custom_op("mope::grouped_lora", mutates_args=())
def grouped_lora_op(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor, base: torch.Tensor,
    chosen: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """GroupedLoRA's forward on flat tensors: the output, the gate and h per sorted pair, dest and offsets."""
    out, state, gate, h = grouped_forward(x, lora_a, lora_b, weights, base, chosen, scaling)
    return out, gate, h, state.groups.dest, state.groups.offsets


@grouped_lora_op.register_fake
def grouped_lora_shapes(x, lora_a, lora_b, weights, base, chosen, scaling):
    pairs, (num_experts, rank, _) = chosen.numel(), lora_a.shape
    sort = chosen.new_empty(pairs), chosen.new_empty(num_experts + 1)
    return base.new_empty(base.shape), weights.new_empty(pairs), x.new_empty(pairs, rank), *sort


@torch.library.custom_op("mope::grouped_lora_backward", mutates_args=())
def grouped_lora_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, gate: torch.Tensor,
    h: torch.Tensor, dest: torch.Tensor, offsets: torch.Tensor, scaling: float, k: int, needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """:func:`grouped_gradients` as an op: an empty tensor where a gradient is not needed."""
    num_experts, rank, _ = lora_a.shape
    tiles = Tiles.of(num_experts, rank, x.dtype, grad_out.dtype)
    state = GroupedState(Groups(dest, offsets, gate, x.shape[0], k), tiles, max(MIN_DOT, tiles.rp))
    grads = grouped_gradients(grad_out, x, lora_a, lora_b, gate, h, state, scaling, needs)
    return [x.new_empty(0) if g is None else g for g in grads]


@grouped_lora_backward_op.register_fake
def grouped_lora_backward_shapes(grad_out, x, lora_a, lora_b, gate, h, dest, offsets, scaling, k, needs):
    weights = gate.new_empty(x.shape[0], lora_a.shape[0])
    grads = [x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), weights]
    return [g if need else x.new_empty(0) for g, need in zip(grads, needs, strict=True)]


def save_for_grouped_backward(ctx, inputs, output) -> None:
    x, lora_a, lora_b, _, _, chosen, scaling = inputs
    ctx.save_for_backward(x, lora_a, lora_b, *output[1:])
    ctx.scaling, ctx.k = scaling, chosen.shape[1]


def grouped_lora_op_backward(ctx, grad_out, *unused):
    needs = list(ctx.needs_input_grad[:4])
    grads = grouped_lora_backward_op(grad_out.contiguous(), *ctx.saved_tensors, ctx.scaling, ctx.k, needs)
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), grad_out, None, None


grouped_lora_op.register_autograd(grouped_lora_op_backward, setup_context=save_for_grouped_backward)


@on_inputs_device
def grouped_lora(x, lora_A, lora_B, weights, scaling: float, base_out, chosen) -> torch.Tensor:
    """:func:`mope.dispatch.lora_masked`'s result over the ``chosen [..., k]`` experts only; any token shape.

    Eager: :class:`GroupedLoRA`; under ``torch.compile``: the custom ops above, so the step stays one graph.
    """
    if not torch.compiler.is_compiling():
        return GroupedLoRA.apply(x, lora_A, lora_B, weights, base_out, chosen, scaling)
    n, k = lora_A.shape[0], chosen.shape[-1]
    flat = x.reshape(-1, x.shape[-1]).contiguous(), lora_A.contiguous(), lora_B.contiguous()
    routing = weights.reshape(-1, n).contiguous(), base_out.reshape(-1, base_out.shape[-1]).contiguous()
    out, *_ = grouped_lora_op(*flat, *routing, chosen.reshape(-1, k).contiguous(), scaling)
    return out.view(*base_out.shape)
