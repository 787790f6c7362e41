"""A layer's top-k router and LoRA experts in one autograd Function (``dispatch="triton"``, eager mode).

The kernels of :class:`mope.kernels.router.RouteTopK` followed by :class:`mope.kernels.lora.RoutedLoRA`
(3 forward) or, where only the chosen experts pay, :class:`mope.kernels.grouped.GroupedLoRA`, in one
Function: what it saves is the host's work between them, which bounds an eager GPU step at small
widths. On this project's CPU, with every Triton launch made to run nothing, a tiny Llama's training
step took 1.94x a PEFT LoRA's host time with the two Functions and 1.68x with this one (masked: 1.82x).

Its backward over every expert takes 4 launches where the two Functions take 6 and an add: the
router's share of the input gradient (``d W``) is added inside the experts' (``rank_up``), and A's,
B's and the router's weight gradients are one launch (:func:`layer_weight_gradients`).

:meth:`mope.layer.MoPELayer.fuses` says when a layer takes it: one active adapter whose top-k
router the router kernel serves (no capacity, token-level, no hooks), plain fp32 LoRA experts
with no dropout, no shared experts. Its values and gradients are the two Functions'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import cdiv
from .grouped import grouped_forward, grouped_gradients
from .lora import BLOCK, Tiles, down, outer_tile, up, use_grouped
from .router import expert_tile, route, route_gradients, scores_gradient, scores_tile


@triton.jit
def layer_weight_gradients(
    grad_hg_ptr, h_ptr, gate_ptr, x_ptr, grad_out_ptr, d_ptr, grad_a_ptr, grad_b_ptr, grad_w_ptr,
    tokens, d_in, d_out, num_experts, rank, router_experts, scale, a_programs, b_programs,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr,
    BN: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """``grad_A = (grad_hg * g)^T x``, ``grad_B = s (h * g)^T grad_out`` and ``grad_W = d^T x`` in one launch.

    Axis 0: programs ``[0, a)`` take A's expert tiles, ``[a, a + b)`` B's, the rest (one) the router's;
    axis 1 tiles the columns of the wider input or output (a program past its own width does nothing).
    """
    program = tl.program_id(0)
    outs = tl.program_id(1) * BN + tl.arange(0, BN)
    first = tl.program_id(1) * BN
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
    elif first < d_in:
        scores_tile(d_ptr, x_ptr, grad_w_ptr, outs, tokens, d_in, router_experts, NP, BT, BN)


def weight_gradients(grad_hg, h, gate, x, grad_out, d, a_cat, b_cat, router_weight, scaling, tiles, needs):
    """:func:`layer_weight_gradients`: A's, B's and the router's gradients (None where ``needs`` says no)."""
    a_programs = tiles.expert_blocks if needs[0] else 0
    b_programs = tiles.expert_blocks if needs[1] else 0
    if not (a_programs or b_programs or needs[2]):
        return None, None, None
    grad_a = torch.empty_like(a_cat) if needs[0] else None
    grad_b = torch.empty_like(b_cat) if needs[1] else None
    grad_w = torch.empty_like(router_weight) if needs[2] else None
    (tokens, d_in), d_out = x.shape, grad_out.shape[1]
    grid = (a_programs + b_programs + int(needs[2]), cdiv(max(d_in, d_out), BLOCK))
    layer_weight_gradients[grid](
        grad_hg if grad_hg is not None else h, h, gate, x, grad_out, d if d is not None else gate,
        *(g if g is not None else gate for g in (grad_a, grad_b, grad_w)),
        tokens, d_in, d_out, tiles.num_experts, tiles.rank, router_weight.shape[0], scaling, a_programs, b_programs,
        DOT=tiles.dot, PRECISION=tiles.precision, BT=BLOCK, EB=tiles.eb, RP=tiles.rp, BN=BLOCK,
        NP=expert_tile(router_weight.shape[0]),
    )  # fmt: skip
    return grad_a, grad_b, grad_w


class RoutedLayer(torch.autograd.Function):
    """``base + s * B_cat (g (x) 1_r * A_cat x)`` with ``g`` the router kernel's top-k weights of ``x``.

    Returns the output and the router's logits, weights and chosen experts (for the losses and
    statistics), all in ``x``'s token shape.
    """

    @staticmethod
    def forward(ctx, x, router_weight, lora_a, lora_b, base, k: int, temperature: float, normalise: bool, scaling):
        n, r, d_in = lora_a.shape
        flat, flat_base = x.reshape(-1, d_in).contiguous(), base.reshape(-1, base.shape[-1]).contiguous()
        logits, weights, chosen = route(flat, router_weight, k, temperature, normalise)
        if use_grouped(flat, n, chosen):  # only the chosen experts (mope.kernels.grouped)
            lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
            out, experts, gate, h = grouped_forward(flat, lora_a, lora_b, weights, flat_base, chosen, scaling)
        else:  # every expert, gate 0 where not chosen (mope.kernels.lora)
            experts, gate = Tiles(n, r, x.dtype, base.dtype), weights
            lora_a, lora_b = lora_a.reshape(n * r, d_in), lora_b.reshape(n * r, -1)
            h, _ = down(flat, lora_a, 1.0, experts, x.dtype)
            out = up(h, weights, lora_b, flat_base, scaling, experts, base.dtype)
        ctx.save_for_backward(flat, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h)
        ctx.settings = temperature, normalise, scaling, experts
        ctx.shapes = x.shape, (n, r, d_in), (n, r, lora_b.shape[-1])
        ctx.mark_non_differentiable(chosen)
        ctx.set_materialize_grads(False)  # outputs nothing reads get no zero-filled gradient
        lead = x.shape[:-1]
        return out.view(*base.shape), logits.view(*lead, n), weights.view(*lead, n), chosen.view(*lead, k)

    @staticmethod
    def backward(ctx, grad_out, grad_logits, grad_weights, grad_chosen):
        x, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h = ctx.saved_tensors
        temperature, normalise, scaling, experts = ctx.settings
        needs_x, needs_router, needs_a, needs_b, needs_base = ctx.needs_input_grad[:5]
        routes = needs_x or needs_router
        every_expert = isinstance(experts, Tiles) and grad_out is not None
        grad_x = grad_a = grad_b = grad_gate = grad_hg = grad_router = None
        flat_out = None if grad_out is None else grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        if every_expert and (needs_x or needs_a or routes):  # s * grad B_cat^T, and the gate's gradient beside it
            grad_hg, grad_gate = down(flat_out, lora_b, scaling, experts, x.dtype, h if routes else None, weights)
        elif flat_out is not None and not every_expert:  # only the chosen experts
            needs = [needs_x, needs_a, needs_b, routes]
            grads = grouped_gradients(flat_out, x, lora_a, lora_b, gate, h, experts, scaling, needs)
            grad_x, grad_a, grad_b, grad_gate = grads
        if grad_weights is not None:  # a loss or statistic read the gate weights too
            grad_weights = grad_weights.reshape(weights.shape)
            grad_gate = grad_weights if grad_gate is None else grad_gate + grad_weights
        if grad_logits is not None:
            grad_logits = grad_logits.reshape(logits.shape)
        routed = routes and (grad_gate is not None or grad_logits is not None)
        if not every_expert:  # the router's kernels: its scores' gradient with d W, then d^T x
            if routed:
                router_x, grad_router = route_gradients(
                    grad_logits, grad_gate, x, router_weight, logits, weights, chosen, temperature, normalise,
                    [needs_x, needs_router],
                )  # fmt: skip
                grad_x = router_x if grad_x is None else grad_x + router_x
            return RoutedLayer.shaped(ctx, grad_x, grad_router, grad_a, grad_b, grad_out if needs_base else None)
        # every expert: the scores' gradient d, then the experts' and the router's share of grad_x in one
        # kernel, and A's, B's and the router's weight gradients in one (4 launches)
        d = None
        if routed:
            d = scores_gradient(grad_logits, grad_gate, logits, weights, chosen, router_weight, temperature, normalise)
        if needs_x:
            grad_x = up(
                grad_hg, weights, lora_a, None, 1.0, experts, x.dtype, None if d is None else (d, router_weight)
            )
        needs = [needs_a, needs_b, needs_router and d is not None]
        grad_a, grad_b, grad_router = weight_gradients(
            grad_hg, h, weights, x, flat_out, d, lora_a, lora_b, router_weight, scaling, experts, needs
        )
        return RoutedLayer.shaped(ctx, grad_x, grad_router, grad_a, grad_b, grad_out if needs_base else None)

    @staticmethod
    def shaped(ctx, grad_x, grad_router, grad_a, grad_b, grad_base) -> tuple:
        """The gradients in the inputs' shapes, one per input of :meth:`forward`."""
        x_shape, a_shape, b_shape = ctx.shapes
        return (
            None if grad_x is None else grad_x.view(*x_shape),
            grad_router,
            None if grad_a is None else grad_a.view(*a_shape),
            None if grad_b is None else grad_b.view(*b_shape),
            grad_base,
            *(None,) * 4,
        )


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output, the router's logits and gate weights ``[..., N]`` and chosen experts ``[..., k]``.

    ``x`` fp32 ``[..., d_in]`` with at least one token; ``normalise``: the kept weights sum to 1
    (else Switch's full-softmax values).
    """
    weight = router_weight.float().contiguous()
    return RoutedLayer.apply(x, weight, lora_A, lora_B, base_out, k, float(temperature), normalise, scaling)
