"""Routed LoRA experts in Triton: the masked form in two kernels forward and four backward.

Computes what :func:`mope.dispatch.lora_masked` computes, ``out = base + s * B_cat (g (x) 1_r * A_cat x)``
over flat tokens, with its gradients, but each product and the gate multiply, the scaling and the
add into the base output that surround it are one kernel, so a layer's expert path launches 2
kernels forward (``rank_down``: ``h = A_cat x``; ``rank_up``: ``base + s * B_cat (g * h)``) and 4
backward (``rank_down`` again for ``s * B_cat^T grad`` and the gate's gradient, ``rank_up`` for
the input's, ``rank_outer`` for A's and B's), where the torch form runs about twice as many
(casts, the gate multiply and its backward, the scaling). Under ``torch.compile`` the same kernels
run as two custom ops, ``mope::routed_lora`` and its backward, so a training step stays one graph.

Layout: the N*r rank columns are tiled by whole experts (``EB`` experts of ``RP`` = r rounded up
to a power of two columns each), so a tile's gate weights are one load of ``[rows, EB]`` and the
gate's gradient (a sum over each expert's r columns) is a reshape and a sum inside the tile.
Token rows are int64 in every kernel (here, the router's, the fused layer's; the grouped kernels take theirs from
the sort's int64 indices): a row times a width is an element's offset, which passes 2^31 at LLM sizes (65,536
tokens of a 32,768-wide projection), where int32 arithmetic wraps.

Precision: products accumulate in fp32; operands enter ``tl.dot`` in the experts' dtype (bf16 /
fp16 tensor cores; fp32 as IEEE fp32 unless torch allows TF32), and ``h`` is kept in the experts'
dtype for the backward, as the masked form keeps it. Triton's CPU interpreter (``TRITON_INTERPRET=1``)
cannot do arithmetic on bf16 values (numpy has no bf16: the sums come out as garbage), so there every
operand is widened to fp32 first and stores round by truncation: results match the GPU's to bf16's
last bit, which the tests allow for.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .grid import cdiv, first_order_only, flat_rows, launch_options, next_power_of_2, on_inputs_device
from .interpreter import installed_interpreter_fault

# every tl.dot operand dimension must be at least this on a GPU
MIN_DOT = 16
TILE_COLUMNS = 64  # rank columns (EB * RP) per tile, unless r alone is wider
BLOCK = 64  # rows of tokens and output columns per tile, and the reduction step
ROUTER_CHUNK = 64  # router experts a step of the router's share d W (tiles [rows, 64] and [64, columns], fp32)
# N / k from which only the chosen experts are computed (mope.kernels.grouped); untuned: the CPU's sparse threshold
GROUPED_MIN_EXPERTS_PER_ACTIVE = 8


@triton.jit
def rank_down(
    x_ptr,
    w_ptr,
    out_ptr,
    h_ptr,
    gate_grad_ptr,
    tokens,
    width,
    num_experts,
    rank,
    scale,
    GATE_GRAD: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    EB: tl.constexpr,
    RP: tl.constexpr,
    BK: tl.constexpr,
):
    """``out[T, N*r] = scale * x[T, D] @ w[N*r, D]^T`` on one tile of rows and experts.

    With ``GATE_GRAD`` (the backward, ``x`` = the output gradient, ``w`` = B_cat) also the gate's
    gradient ``gate_grad[t, e] = sum_i out[t, e*r + i] * h[t, e*r + i]``.
    """
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    down_tile(
        x_ptr, w_ptr, out_ptr, h_ptr, gate_grad_ptr, rows, tl.program_id(1) * EB, tokens, width, num_experts, rank,
        scale, GATE_GRAD, DOT, PRECISION, BM, EB, RP, BK,
    )  # fmt: skip


@triton.jit
def down_tile(
    x_ptr, w_ptr, out_ptr, h_ptr, gate_grad_ptr, rows, e0, tokens, width, num_experts, rank, scale,
    GATE_GRAD: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, EB: tl.constexpr,
    RP: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """:func:`rank_down` for the token rows ``rows`` and experts ``[e0, e0 + EB)``."""
    experts = e0 + tl.arange(0, EB)
    rows_ok = rows < tokens
    acc, cols, tile_ok = down_product(
        x_ptr, w_ptr, out_ptr, rows, e0, tokens, width, num_experts, rank, scale, DOT, PRECISION, BM, EB, RP, BK
    )
    if GATE_GRAD:
        per_expert = gate_gradient(acc, h_ptr, rows, cols, tile_ok, num_experts * rank, BM, EB, RP)
        tl.store(
            gate_grad_ptr + rows[:, None] * num_experts + experts[None, :],
            per_expert.to(gate_grad_ptr.dtype.element_ty),
            mask=rows_ok[:, None] & (experts[None, :] < num_experts),
        )


@triton.jit
def down_product(
    x_ptr, w_ptr, out_ptr, rows, e0, tokens, width, num_experts, rank, scale, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """``scale * x @ w^T`` on the rows ``rows`` and experts ``[e0, e0 + EB)``, stored to ``out``; returns it in fp32
    with its columns of ``[T, N*r]`` and their bounds."""
    experts = e0 + tl.arange(0, EB)
    ranks = tl.arange(0, RP)
    cols = tl.reshape(experts[:, None] * rank + ranks[None, :], (EB * RP,))
    cols_ok = tl.reshape((experts[:, None] < num_experts) & (ranks[None, :] < rank), (EB * RP,))
    rows_ok = rows < tokens
    acc = tl.zeros((BM, EB * RP), dtype=tl.float32)
    for k0 in range(0, width, BK):
        ks = k0 + tl.arange(0, BK)
        ks_ok = ks < width
        x = tl.load(x_ptr + rows[:, None] * width + ks[None, :], mask=rows_ok[:, None] & ks_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * width + ks[:, None], mask=cols_ok[None, :] & ks_ok[:, None], other=0.0)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    acc = acc * scale
    tile_ok = rows_ok[:, None] & cols_ok[None, :]
    tl.store(
        out_ptr + rows[:, None] * (num_experts * rank) + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_ok
    )
    return acc, cols, tile_ok


@triton.jit
def gate_gradient(acc, h_ptr, rows, cols, tile_ok, inner, BM: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr):
    """The gate's gradient ``[BM, EB]``: ``sum_i acc[t, e*r + i] * h[t, e*r + i]`` over each expert's r columns."""
    h = tl.load(h_ptr + rows[:, None] * inner + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return tl.sum(tl.reshape(acc * h, (BM, EB, RP)), axis=2)


@triton.jit
def gated_tile(p_ptr, gate_ptr, rows, rows_ok, e0, num_experts, rank, EB: tl.constexpr, RP: tl.constexpr):
    """``p[rows, cols] * gate[rows, expert(col)]`` in fp32 for experts ``[e0, e0 + EB)``, and the columns."""
    experts = e0 + tl.arange(0, EB)
    ranks = tl.arange(0, RP)
    cols = tl.reshape(experts[:, None] * rank + ranks[None, :], (EB * RP,))
    col_expert = tl.reshape(experts[:, None] + ranks[None, :] * 0, (EB * RP,))
    cols_ok = tl.reshape((experts[:, None] < num_experts) & (ranks[None, :] < rank), (EB * RP,))
    tile_ok = rows_ok[:, None] & cols_ok[None, :]
    p = tl.load(p_ptr + rows[:, None] * (num_experts * rank) + cols[None, :], mask=tile_ok, other=0.0)
    g = tl.load(gate_ptr + rows[:, None] * num_experts + col_expert[None, :], mask=tile_ok, other=0.0)
    return p.to(tl.float32) * g.to(tl.float32), cols, cols_ok


@triton.jit
def rank_up(
    p_ptr,
    gate_ptr,
    w_ptr,
    base_ptr,
    d_ptr,
    router_w_ptr,
    out_ptr,
    tokens,
    width,
    num_experts,
    rank,
    router_experts,
    scale,
    HAS_BASE: tl.constexpr,
    ROUTER: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    EB: tl.constexpr,
    RP: tl.constexpr,
    BN: tl.constexpr,
    NR: tl.constexpr,
):
    """``out[T, D] = base + scale * (p * (gate (x) 1_r)) @ w[N*r, D]`` on one tile of rows and columns.

    With ``ROUTER`` (the fused layer's input gradient) plus ``d[T, N'] @ router_w[N', D]`` in IEEE fp32,
    the router's share of it (:func:`router_share`, ``NR`` router experts a step).
    """
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    outs = tl.program_id(1) * BN + tl.arange(0, BN)
    up_tile(
        p_ptr, gate_ptr, w_ptr, base_ptr, d_ptr, router_w_ptr, out_ptr, rows, outs, tokens, width, num_experts, rank,
        router_experts, scale, HAS_BASE, ROUTER, DOT, PRECISION, BM, EB, RP, BN, NR,
    )  # fmt: skip


@triton.jit
def up_tile(
    p_ptr, gate_ptr, w_ptr, base_ptr, d_ptr, router_w_ptr, out_ptr, rows, outs, tokens, width, num_experts, rank,
    router_experts, scale, HAS_BASE: tl.constexpr, ROUTER: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, NR: tl.constexpr,
):  # fmt: skip
    """:func:`rank_up` for the token rows ``rows`` and output columns ``outs``."""
    rows_ok, outs_ok = rows < tokens, outs < width
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for e0 in range(0, num_experts, EB):
        pg, cols, cols_ok = gated_tile(p_ptr, gate_ptr, rows, rows_ok, e0, num_experts, rank, EB, RP)
        w = tl.load(w_ptr + cols[:, None] * width + outs[None, :], mask=cols_ok[:, None] & outs_ok[None, :], other=0.0)
        acc = tl.dot(pg.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    acc = acc * scale
    if ROUTER:
        acc = router_share(acc, d_ptr, router_w_ptr, rows, rows_ok, outs, outs_ok, router_experts, width, NR)
    tile_ok = rows_ok[:, None] & outs_ok[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + rows[:, None] * width + outs[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * width + outs[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def router_share(acc, d_ptr, router_w_ptr, rows, rows_ok, outs, outs_ok, router_experts, width, NR: tl.constexpr):
    """``acc + d[rows] @ router_w[:, outs]`` (``d [T, N']``, ``router_w [N', width]``) in IEEE fp32, ``NR`` router
    experts a step, so that the tiles held stay small however many experts route (``NR``: :func:`router_chunk`)."""
    for r0 in range(0, router_experts, NR):
        routers = r0 + tl.arange(0, NR)
        routers_ok = routers < router_experts
        d = tl.load(
            d_ptr + rows[:, None] * router_experts + routers[None, :], mask=rows_ok[:, None] & routers_ok[None, :],
            other=0.0,
        )  # fmt: skip
        w = tl.load(
            router_w_ptr + routers[:, None] * width + outs[None, :], mask=routers_ok[:, None] & outs_ok[None, :],
            other=0.0,
        )  # fmt: skip
        acc = tl.dot(d, w, acc, input_precision="ieee")
    return acc


@functools.cache
def router_chunk(router_experts: int) -> int:
    """:func:`router_share`'s step: N' rounded up to a power of two, at least 16 (``tl.dot``), at most
    ``ROUTER_CHUNK``."""
    return min(ROUTER_CHUNK, max(MIN_DOT, next_power_of_2(router_experts)))


@triton.jit
def rank_outer(
    p_ptr,
    gate_ptr,
    y_ptr,
    out_ptr,
    tokens,
    width,
    num_experts,
    rank,
    scale,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BT: tl.constexpr,
    EB: tl.constexpr,
    RP: tl.constexpr,
    BN: tl.constexpr,
):
    """``out[N*r, D] = scale * (p * (gate (x) 1_r))^T @ y[T, D]`` on one tile of experts and columns (sums over T)."""
    outs = tl.program_id(1) * BN + tl.arange(0, BN)
    outer_tile(
        p_ptr, gate_ptr, y_ptr, out_ptr, tl.program_id(0) * EB, outs, tokens, width, num_experts, rank, scale,
        DOT, PRECISION, BT, EB, RP, BN,
    )  # fmt: skip


@triton.jit
def outer_tile(
    p_ptr, gate_ptr, y_ptr, out_ptr, e0, outs, tokens, width, num_experts, rank, scale,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    """:func:`rank_outer` for experts ``[e0, e0 + EB)`` and the output columns ``outs``."""
    outs_ok = outs < width
    acc = tl.zeros((EB * RP, BN), dtype=tl.float32)
    cols = tl.zeros((EB * RP,), dtype=tl.int32)
    cols_ok = cols < 0
    for t0 in range(0, tokens, BT):
        rows = t0 + tl.arange(0, BT).to(tl.int64)
        rows_ok = rows < tokens
        pg, cols, cols_ok = gated_tile(p_ptr, gate_ptr, rows, rows_ok, e0, num_experts, rank, EB, RP)
        y = tl.load(y_ptr + rows[:, None] * width + outs[None, :], mask=rows_ok[:, None] & outs_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(pg).to(DOT), y.to(DOT), acc, input_precision=PRECISION)
    acc = acc * scale
    tile_ok = cols_ok[:, None] & outs_ok[None, :]
    tl.store(out_ptr + cols[:, None] * width + outs[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


INTERPRETED: bool = isinstance(rank_down, InterpretedFunction)
# why the interpreter cannot run the kernels with the installed Triton and NumPy, or None (read once)
INTERPRETER_FAULT: str | None = installed_interpreter_fault() if INTERPRETED else None
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class Tiles:
    """Tile sizes and dot settings for one call: experts per tile so a tile is ~64 rank columns, >= 16 wide.

    Immutable; :meth:`of` keeps one per shape, dtypes and TF32 setting (building one took about 4 us of a
    layer's host time, every call).
    """

    def __init__(self, num_experts: int, rank: int, *dtypes: torch.dtype, tf32: bool | None = None) -> None:
        self.num_experts, self.rank = num_experts, rank
        self.rp = next_power_of_2(rank)
        wanted = min(next_power_of_2(num_experts), max(1, TILE_COLUMNS // self.rp))
        self.eb = max(wanted, max(1, MIN_DOT // self.rp))
        self.expert_blocks = cdiv(num_experts, self.eb)
        wide = INTERPRETED or torch.float32 in dtypes or len(set(dtypes)) > 1
        self.dot = tl.float32 if wide else TL_DTYPES[dtypes[0]]
        tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
        self.precision = "tf32" if tf32 and not INTERPRETED else "ieee"

    @staticmethod
    def of(num_experts: int, rank: int, *dtypes: torch.dtype) -> Tiles:
        """The kept :class:`Tiles` for these experts and dtypes under torch's current TF32 setting."""
        return kept_tiles(num_experts, rank, dtypes, torch.backends.cuda.matmul.allow_tf32)


@functools.lru_cache(maxsize=256)
def kept_tiles(num_experts: int, rank: int, dtypes: tuple[torch.dtype, ...], tf32: bool) -> Tiles:
    return Tiles(num_experts, rank, *dtypes, tf32=tf32)


def down(x: torch.Tensor, w: torch.Tensor, scale: float, tiles: Tiles, out_dtype: torch.dtype, h=None, gate=None):
    """``scale * x @ w^T`` ``[T, N*r]``; with ``h``, also the gate's gradient ``[T, N]`` in ``gate``'s dtype."""
    tokens, width = x.shape
    out = x.new_empty(tokens, tiles.num_experts * tiles.rank, dtype=out_dtype)
    gate_grad = None if h is None else x.new_empty(tokens, tiles.num_experts, dtype=gate.dtype)
    grid = (cdiv(tokens, BLOCK), tiles.expert_blocks)
    rank_down[grid](
        x, w, out, h if h is not None else out, gate_grad if gate_grad is not None else out,
        tokens, width, tiles.num_experts, tiles.rank, scale,
        GATE_GRAD=h is not None, DOT=tiles.dot, PRECISION=tiles.precision,
        BM=BLOCK, EB=tiles.eb, RP=tiles.rp, BK=BLOCK, **launch_options(),
    )  # fmt: skip
    return out, gate_grad


def up(p, gate, w, base, scale: float, tiles: Tiles, out_dtype: torch.dtype, router=None, shape=None) -> torch.Tensor:
    """``base + scale * (p * gate (x) 1_r) @ w`` ``[T, D]`` (no ``base``: just the product); ``w``: ``[N*r, D]`` or
    ``[N, r, D]``, contiguous.

    ``router``: ``(d [T, N'], router_w [N', D])``, fp32, whose product is added too (in IEEE fp32).
    ``shape``: the output's shape, ``[..., D]`` with T tokens (a view afterwards costs the host about 2 us).
    """
    tokens, width = p.shape[0], w.shape[-1]
    out = p.new_empty(*(shape if shape is not None else (tokens, width)), dtype=out_dtype)  # ints: a shape is slower
    d, router_w = router if router is not None else (out, out)
    router_experts = d.shape[1] if router is not None else 1
    grid = (cdiv(tokens, BLOCK), cdiv(width, BLOCK))
    rank_up[grid](
        p, gate, w, base if base is not None else out, d, router_w, out,
        tokens, width, tiles.num_experts, tiles.rank, router_experts, scale,
        HAS_BASE=base is not None, ROUTER=router is not None, DOT=tiles.dot, PRECISION=tiles.precision,
        BM=BLOCK, EB=tiles.eb, RP=tiles.rp, BN=BLOCK, NR=router_chunk(router_experts), **launch_options(),
    )  # fmt: skip
    return out


def outer(p, gate, y, scale: float, tiles: Tiles, out_dtype: torch.dtype) -> torch.Tensor:
    """``scale * (p * gate (x) 1_r)^T @ y`` ``[N*r, D]``: a factor's gradient."""
    tokens, width = y.shape
    out = y.new_empty(tiles.num_experts * tiles.rank, width, dtype=out_dtype)
    grid = (tiles.expert_blocks, cdiv(width, BLOCK))
    rank_outer[grid](
        p, gate, y, out, tokens, width, tiles.num_experts, tiles.rank, scale,
        DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK, EB=tiles.eb, RP=tiles.rp, BN=BLOCK, **launch_options(),
    )  # fmt: skip
    return out


class RoutedLoRA(torch.autograd.Function):
    """``base + s * B_cat (gate (x) 1_r * A_cat x)`` for tensors of any token shape.

    It flattens them itself, inside the Function, where autograd does not track the views: each
    tracked view outside it would cost the host a few microseconds forward and backward. Shapes are
    passed to ``view`` unpacked: a ``torch.Size`` argument costs about 2 us more to parse.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weights, base, scaling: float, tiles: Tiles):
        n, r, d_in = lora_a.shape
        # contiguous: a factor that is a view (a slice of a wider tensor) reshapes to rows a stride apart
        a_cat, b_cat = lora_a.reshape(n * r, d_in).contiguous(), lora_b.reshape(n * r, -1).contiguous()
        flat_x, gate, flat_base = flat_rows(x), flat_rows(weights), flat_rows(base)
        h, _ = down(flat_x, a_cat, 1.0, tiles, x.dtype)
        ctx.save_for_backward(flat_x, a_cat, b_cat, gate, h)
        ctx.scaling, ctx.tiles, ctx.shapes = scaling, tiles, (x.shape, lora_a.shape, lora_b.shape, weights.shape)
        return up(h, gate, b_cat, flat_base, scaling, tiles, base.dtype).view(*base.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, a_cat, b_cat, gate, h = ctx.saved_tensors
        needs = ctx.needs_input_grad
        flat_grad = flat_rows(grad_out)
        grads = gradients(flat_grad, x, a_cat, b_cat, gate, h, ctx.scaling, ctx.tiles, needs[:4])
        grads = [None if g is None else g.view(*shape) for g, shape in zip(grads, ctx.shapes, strict=True)]
        return *grads, grad_out if needs[4] else None, None, None


def gradients(grad_out, x, a_cat, b_cat, gate, h, s: float, tiles: Tiles, needs) -> list[torch.Tensor | None]:
    """The gradients of ``x``, ``A_cat``, ``B_cat`` and the gate (None where ``needs`` says no): 4 kernels at most."""
    grad_x = grad_a = grad_b = grad_gate = None
    if needs[0] or needs[1] or needs[3]:
        # s * grad B_cat^T: the gradient of the gated h before the gate (and the gate's, beside it)
        grad_hg, grad_gate = down(grad_out, b_cat, s, tiles, x.dtype, h if needs[3] else None, gate)
        if needs[0]:
            grad_x = up(grad_hg, gate, a_cat, None, 1.0, tiles, x.dtype)
        if needs[1]:
            grad_a = outer(grad_hg, gate, x, 1.0, tiles, a_cat.dtype)
    if needs[2]:
        grad_b = outer(h, gate, grad_out, s, tiles, b_cat.dtype)
    return [grad_x, grad_a, grad_b, grad_gate]


# torch.compile: the same kernels as custom ops ------------------------------------------------------------
#
# A compiled graph calls these opaque ops (Dynamo sees only their declared shapes) in place of RoutedLoRA.
# Under TRITON_INTERPRET=1 Dynamo cannot trace RoutedLoRA (its launch of an interpreted kernel ends in a
# function Dynamo skips, torch.package's _patched_getfile), and torch.library.triton_op, which would let
# inductor see the kernels, cannot be traced there either: wrap_triton returns the bare interpreted kernel
# and triton_op's shape function is the op's body, so tracing launches the kernel on FakeTensors ("Cannot
# access data pointer of Tensor"). Custom ops are traced the same way on CPU and on CUDA, so the CPU tests
# check the GPU's path. Eager mode keeps RoutedLoRA: a custom op's dispatch costs several times an
# autograd.Function's on the host (80 against 17 us here), the cost these kernels exist to remove.


@torch.library.custom_op("mope::routed_lora", mutates_args=())
def routed_lora_op(
    x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, gate: torch.Tensor, base: torch.Tensor,
    scaling: float, num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """RoutedLoRA's forward: the output, and ``h = A_cat x`` for the backward."""
    tiles = Tiles.of(num_experts, a_cat.shape[0] // num_experts, x.dtype, base.dtype)
    h, _ = down(x, a_cat, 1.0, tiles, x.dtype)
    return up(h, gate, b_cat, base, scaling, tiles, base.dtype), h


@routed_lora_op.register_fake
def routed_lora_shapes(x, a_cat, b_cat, gate, base, scaling, num_experts):
    return base.new_empty(base.shape), x.new_empty(x.shape[0], a_cat.shape[0])


@torch.library.custom_op("mope::routed_lora_backward", mutates_args=())
def routed_lora_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, gate: torch.Tensor,
    h: torch.Tensor, scaling: float, num_experts: int, needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """:func:`gradients` as an op: an empty tensor where a gradient is not needed (an op returns no None)."""
    tiles = Tiles.of(num_experts, a_cat.shape[0] // num_experts, x.dtype, grad_out.dtype)
    grads = gradients(grad_out, x, a_cat, b_cat, gate, h, scaling, tiles, needs)
    return [x.new_empty(0) if g is None else g for g in grads]


@routed_lora_backward_op.register_fake
def routed_lora_backward_shapes(grad_out, x, a_cat, b_cat, gate, h, scaling, num_experts, needs):
    grads = [x.new_empty(x.shape), a_cat.new_empty(a_cat.shape), b_cat.new_empty(b_cat.shape)]
    return [g if need else x.new_empty(0) for g, need in zip([*grads, gate.new_empty(gate.shape)], needs, strict=True)]


def save_for_op_backward(ctx, inputs, output) -> None:
    x, a_cat, b_cat, gate, _, scaling, num_experts = inputs
    ctx.save_for_backward(x, a_cat, b_cat, gate, output[1])
    ctx.scaling, ctx.num_experts = scaling, num_experts


def routed_lora_op_backward(ctx, grad_out, grad_h):
    x, a_cat, b_cat, gate, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = routed_lora_backward_op(
        grad_out.contiguous(), x, a_cat, b_cat, gate, h, ctx.scaling, ctx.num_experts, needs
    )
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), grad_out, None, None


routed_lora_op.register_autograd(routed_lora_op_backward, setup_context=save_for_op_backward)


def use_grouped(x: torch.Tensor, num_experts: int, chosen: torch.Tensor | None) -> bool:
    """Compute only the chosen experts: the gate lists them, N/k is large, tokens exist."""
    return chosen is not None and x.numel() > 0 and grouped_pays(num_experts, chosen.shape[-1])


def grouped_pays(num_experts: int, active: int) -> bool:
    """Whether N experts with ``active`` (k) per token are worth computing only the chosen ones: N/k is large."""
    return num_experts >= GROUPED_MIN_EXPERTS_PER_ACTIVE * active


@on_inputs_device
def routed_lora(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
) -> torch.Tensor:
    """:func:`mope.dispatch.lora_masked`'s result through the kernels: any token shape, out of place.

    The masked form: it needs no chosen experts (unused ones have weight 0); under ``torch.compile``
    as the custom op ``mope::routed_lora``. Where only the chosen experts pay (:func:`use_grouped`),
    :func:`mope.dispatch.lora_triton` calls :mod:`mope.kernels.grouped` instead.
    """
    n, r, d_in = lora_A.shape
    if x.numel() == 0:  # no tokens: nothing to launch (a grid of zero programs is an error)
        return base_out + 0 * (lora_A.sum() + lora_B.sum() + weights.sum())
    if not torch.compiler.is_compiling():
        return RoutedLoRA.apply(x, lora_A, lora_B, weights, base_out, scaling, Tiles.of(n, r, x.dtype, base_out.dtype))
    a_cat, b_cat = lora_A.reshape(n * r, d_in).contiguous(), lora_B.reshape(n * r, -1).contiguous()
    flat = x.reshape(-1, d_in).contiguous(), a_cat, b_cat
    gate, base = weights.reshape(-1, n).contiguous(), base_out.reshape(-1, base_out.shape[-1]).contiguous()
    out, _ = routed_lora_op(*flat, gate, base, scaling, n)
    return out.view(*base_out.shape)
