"""A layer's top-k router and LoRA experts in one autograd Function (``dispatch="triton"``, eager mode).

The same kernels, and as many launches, as :class:`mope.kernels.router.RouteTopK` followed by
:class:`mope.kernels.lora.RoutedLoRA` (3 forward, 6 backward) or, where only the chosen experts pay,
:class:`mope.kernels.grouped.GroupedLoRA`, in one Function: what it saves is
the host's work between them, which bounds an eager GPU step at small widths. On this project's
CPU, with every Triton launch made to run nothing, a tiny Llama's training step took 1.94x a PEFT
LoRA's host time with the two Functions and 1.68x with this one (masked: 1.82x).

:meth:`mope.layer.MoPELayer.fuses` says when a layer takes it: one active adapter whose top-k
router the router kernel serves (no capacity, token-level, no hooks), plain fp32 LoRA experts
with no dropout, no shared experts. Its values and gradients are the two Functions'.
"""

from __future__ import annotations

import torch

from .grouped import grouped_forward, grouped_gradients
from .lora import Tiles, down, gradients, up, use_grouped
from .router import route, route_gradients


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
        x_shape, a_shape, b_shape = ctx.shapes
        needs_x, needs_router, needs_a, needs_b, needs_base = ctx.needs_input_grad[:5]
        routes = needs_x or needs_router
        grad_x = grad_a = grad_b = grad_gate = None
        if grad_out is not None:
            flat_out = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
            needs = [needs_x, needs_a, needs_b, routes]
            if isinstance(experts, Tiles):
                grads = gradients(flat_out, x, lora_a, lora_b, weights, h, scaling, experts, needs)
            else:
                grads = grouped_gradients(flat_out, x, lora_a, lora_b, gate, h, experts, scaling, needs)
            grad_x, grad_a, grad_b, grad_gate = grads
        if grad_weights is not None:  # a loss or statistic read the gate weights too
            grad_weights = grad_weights.reshape(weights.shape)
            grad_gate = grad_weights if grad_gate is None else grad_gate + grad_weights
        if grad_logits is not None:
            grad_logits = grad_logits.reshape(logits.shape)
        grad_router = None
        if routes and (grad_gate is not None or grad_logits is not None):
            router_x, grad_router = route_gradients(
                grad_logits, grad_gate, x, router_weight, logits, weights, chosen, temperature, normalise,
                [needs_x, needs_router],
            )  # fmt: skip
            grad_x = router_x if grad_x is None else grad_x + router_x
        return (
            None if grad_x is None else grad_x.view(*x_shape),
            grad_router,
            None if grad_a is None else grad_a.view(*a_shape),
            None if grad_b is None else grad_b.view(*b_shape),
            grad_out if needs_base else None,
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
