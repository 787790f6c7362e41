"""A layer's top-k router and its chosen LoRA experts for a few tokens without gradients, in one kernel.

Decoding runs one new token (per sequence) through every adapted layer, under ``torch.no_grad``.
The training path launches three kernels per layer (router, down, up: :mod:`mope.kernels.layer`)
behind an autograd Function; here one kernel, called directly, does all of it for each token:
the logits, the top-k and the gate weights as the router kernel computes them
(:func:`mope.kernels.router.top_k_of`: same ties, same weights), then only the k chosen experts'
``h_j = A_{e_j} x`` and ``base + s * sum_j g_j h_j B_{e_j}``. A program takes one token and
``COLUMNS`` output columns; the router and the k down-projections are recomputed by each of a
token's ``ceil(d_out / COLUMNS)`` programs (a few hundred kilobytes from L2 each at LLM widths),
which is why only a few tokens take this path (:data:`DECODE_MAX_TOKENS`); prefill and training
take the training path's kernels (:mod:`mope.kernels.layer`).

Products are fp32 sums of elementwise products (no ``tl.dot``: one token has no tile to fill),
so the logits may differ from the router kernel's in the last bits, as the torch router's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import cdiv, flat_rows, launch_options, next_power_of_2, on_inputs_device
from .router import expert_tile, top_k_of

DECODE_MAX_TOKENS = 16  # a forward with at most this many tokens and no gradient takes the one kernel
COLUMNS = 256  # output columns per program
BLOCK = 64  # columns of the input (or output) per step
TILE = 4096  # elements of the [k, r, step] tiles of the expert factors a program holds at once


@triton.jit
def routed_decode_kernel(
    x_ptr, router_ptr, a_ptr, b_ptr, base_ptr, out_ptr, width, width_out, num_experts, rank, temperature, scale,
    K: tl.constexpr, KP: tl.constexpr, NORMALISE: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """``out[t, cols] = base[t, cols] + scale * sum_j g_j (A_{e_j} x_t) B_{e_j}[:, cols]`` over t's k chosen."""
    token = tl.program_id(0)
    experts = tl.arange(0, NP)
    experts_ok = experts < num_experts
    logits = tl.zeros((NP,), dtype=tl.float32)
    for k0 in range(0, width, BK):
        ks = k0 + tl.arange(0, BK)
        ks_ok = ks < width
        x = tl.load(x_ptr + token * width + ks, mask=ks_ok, other=0.0)
        scores = router_ptr + experts[:, None] * width + ks[None, :]
        w = tl.load(scores, mask=experts_ok[:, None] & ks_ok[None, :], other=0.0)
        logits += tl.sum(w * x[None, :], axis=1)
    logits = (logits / temperature)[None, :]
    # STORE_CHOSEN off: the chosen experts' pointer and row bounds are never read (x_ptr and False stand in)
    weights, kept = top_k_of(logits, experts, experts_ok, x_ptr, token < 0, False, K, NORMALISE, NP)
    # slot j: the j-th kept expert in index order, and its gate weight
    slot_of = tl.cumsum(kept.to(tl.int32), axis=1) - 1
    slots = tl.arange(0, KP)
    in_slot = kept & (slot_of == slots[:, None])  # [KP, NP]
    chosen = tl.sum(tl.where(in_slot, experts[None, :], 0), axis=1)
    gate = tl.sum(tl.where(in_slot, weights, 0.0), axis=1)
    ranks = tl.arange(0, RP)
    factor_ok = (slots < K)[:, None, None] & (ranks < rank)[None, :, None]
    rows = (chosen[:, None] * rank + ranks[None, :])[:, :, None]  # [KP, RP, 1]: each slot's rows of A and B
    h = tl.zeros((KP, RP), dtype=tl.float32)
    for k0 in range(0, width, BK):
        ks = k0 + tl.arange(0, BK)
        ks_ok = ks < width
        x = tl.load(x_ptr + token * width + ks, mask=ks_ok, other=0.0)
        a = tl.load(a_ptr + rows * width + ks[None, None, :], mask=factor_ok & ks_ok[None, None, :], other=0.0)
        h += tl.sum(a * x[None, None, :], axis=2)
    gated = (h * gate[:, None])[:, :, None]
    start = tl.program_id(1) * COLS
    for c0 in range(start, tl.minimum(start + COLS, width_out), BN):
        cols = c0 + tl.arange(0, BN)
        cols_ok = cols < width_out
        b = tl.load(b_ptr + rows * width_out + cols[None, None, :], mask=factor_ok & cols_ok[None, None, :], other=0.0)
        acc = tl.sum(tl.sum(b * gated, axis=1), axis=0) * scale
        base = tl.load(base_ptr + token * width_out + cols, mask=cols_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * width_out + cols, (base + acc).to(out_ptr.dtype.element_ty), mask=cols_ok)


def decodes(x: torch.Tensor) -> bool:
    """Whether a layer's call on ``x`` takes the one kernel: few tokens, no gradient wanted, eager mode."""
    few = 0 < x.shape[:-1].numel() <= DECODE_MAX_TOKENS
    return few and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


@on_inputs_device
def routed_decode(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_out: torch.Tensor,
    k: int,
    temperature: float,
    normalise: bool,
    scaling: float,
) -> torch.Tensor:
    """:func:`mope.kernels.layer.routed_layer`'s output (nothing else) for fp32 ``x [..., d_in]``, no gradient."""
    num_experts, rank, width = lora_A.shape
    width_out = lora_B.shape[-1]
    flat, base = flat_rows(x), flat_rows(base_out)
    out = torch.empty_like(base)
    kp, rp = next_power_of_2(k), next_power_of_2(rank)
    block = max(16, min(BLOCK, TILE // (kp * rp)))
    routed_decode_kernel[(flat.shape[0], cdiv(width_out, COLUMNS))](
        flat, router_weight.float().contiguous(), lora_A.contiguous(), lora_B.contiguous(), base, out,
        width, width_out, num_experts, rank, float(temperature), scaling,
        K=k, KP=kp, NORMALISE=normalise, NP=expert_tile(num_experts), RP=rp, BK=block, BN=block, COLS=COLUMNS,
        **launch_options(),
    )  # fmt: skip
    return out.view(*base_out.shape)
