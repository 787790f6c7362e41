"""A layer's top-k router and LoRA experts in one autograd Function (``dispatch="triton"``), or one custom op.

What :class:`mope.kernels.router.RouteTopK` followed by :class:`mope.kernels.lora.RoutedLoRA` or, where
only the chosen experts pay, :class:`mope.kernels.grouped.GroupedLoRA` compute, in one Function: it saves
the host's work between them, which bounds an eager GPU step at small widths. On this project's CPU,
with every Triton launch made to run nothing, a tiny Llama's training step took 1.94x a PEFT LoRA's
host time with the two Functions and 1.68x with this one (masked: 1.82x).

Over every expert it also launches fewer kernels than the two Functions: 2 forward instead of 3 (the
router's tiles and ``A_cat x``'s in one launch) and 3 backward instead of 6 and an add (``s B_cat^T grad``
with the gate's gradient; the scores' gradient ``d``; then the input's gradient with the router's share
``d W`` and A's, B's and the router's weight gradients in one launch whose programs split between them), 2
where one tile holds every expert's ranks (N r <= 64, as at top-2 of 8 with r = 8: the gate's gradient and
from it the scores' in one launch). Over only the chosen experts it takes 3 launches and a sum forward (the
router, which also counts each block's pairs per expert where the sort can take them; the sort's placing;
every pair's row, :func:`mope.kernels.grouped.grouped_pairs`) and 3 launches and a sum backward, no zero
fill (:func:`chosen_expert_gradients`: the gate's gradient per pair, the scores', then the input's gradient
per (token, expert) pair, with the router's ``d W`` on each token's first pair, and every weight gradient in
one launch). The merged kernels are in :mod:`mope.kernels.layer_kernels`.

:meth:`mope.layer.MoPELayer.fuses` says when a layer takes it: one active adapter whose top-k
router the router kernel serves (no capacity, token-level, no hooks), plain fp32 LoRA experts
with no dropout, no shared experts. Its values and gradients are the two Functions'. Where the layer's
only router losses are the default ones, its router launch also fills a :class:`mope.losses.LossSums` (their
sums per block of tokens), so the losses read no logits (eager only). Under ``torch.compile`` the layer runs
as one custom op, ``mope::routed_layer`` (every expert) or ``mope::routed_grouped_layer`` (only the chosen),
and its backward op, with the same launches: a compiled step calls one op per layer where the modules' ops
made two.
"""

from __future__ import annotations

import torch

from ..losses import LossSums
from . import grouped
from .grid import first_order_only, flat_rows, on_inputs_device
from .grouped import GroupedState, Groups, grouped_forward
from .layer_kernels import chosen_gradients, down_with_scores, gradients_of_layer, routed_down
from .lora import MIN_DOT, Tiles, down, grouped_pays, up
from .router import BLOCK as ROUTER_BLOCK
from .router import route, route_gradients, scores_gradient


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
    per_pair = grad_gate is not None and grad_weights is None  # the experts' gate gradient alone, [T*k]
    if grad_weights is not None:  # a loss or statistic read the gate weights too: [T, N], the experts' added
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


def every_expert_gradients(
    flat_out, grad_logits, grad_weights, x, router_weight, a_cat, b_cat, logits, weights, chosen, h,
    temperature: float, normalise: bool, scaling: float, tiles: Tiles, needs, grad_sums=None, x_shape=None,
) -> list[torch.Tensor | None]:  # fmt: skip
    """The gradients of ``x``, the router's weight, ``A_cat`` and ``B_cat`` over every expert (None where ``needs``
    says no): ``s B_cat^T grad`` with the gate's gradient, the scores' gradient ``d`` (the two in one launch where
    one tile holds every expert), then the input's gradient (experts' and router's ``d W``) and every weight
    gradient in one launch: 2 or 3 launches.

    ``grad_logits`` / ``grad_weights`` ``[T, N]`` may be None (no loss read that output); ``grad_sums``: a
    LossSums' ``(token weights, rows, the gradient of its stats)`` or None
    (:func:`mope.kernels.router.scores_gradient`). The weight gradients take the shapes of ``a_cat`` and ``b_cat``,
    the input's ``x_shape`` (default: ``x``'s).
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


def route_and_count(x, router_weight, k: int, temperature: float, normalise: bool, sums=None):
    """:func:`mope.kernels.router.route`'s logits, weights and chosen experts, and the counts of each block's pairs
    per expert for the grouped sort where it can take them (:func:`mope.kernels.grouped.counts_fit`), else None."""
    if grouped.counts_fit(router_weight.shape[0], k, ROUTER_BLOCK):
        return route(x, router_weight, k, temperature, normalise, sums, counts=True)
    return *route(x, router_weight, k, temperature, normalise, sums), None


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
            logits, weights, chosen, counted = route_and_count(flat, router_weight, k, temperature, normalise, sums)
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
        # of the sums only what the backward reads: the stats are an output, whose grad_fn is this context (kept
        # here, they made a cycle that a model's step never freed: every step leaked its layers' contexts)
        layout = None if sums is None else (sums.token_weights, sums.rows)
        ctx.settings = temperature, normalise, scaling, experts, layout, routing, x.shape
        ctx.set_materialize_grads(False)  # outputs nothing reads get no zero-filled gradient
        outputs = (out,)
        if routing:
            ctx.mark_non_differentiable(chosen)
            lead = x.shape[:-1]
            outputs += logits.view(*lead, n), weights.view(*lead, n), chosen.view(*lead, k)
        return outputs if sums is None else (*outputs, sums.stats)  # no None output: autograd wraps each

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out, *grad_rest):
        x, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h = ctx.saved_tensors
        temperature, normalise, scaling, experts, layout, routing, x_shape = ctx.settings
        grad_logits, grad_weights = grad_rest[:2] if routing else (None, None)
        grad_sums = None if layout is None or grad_rest[-1] is None else (*layout, grad_rest[-1])
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


# torch.compile: the every-expert form as custom ops (why custom ops: mope.kernels.lora) -----------------


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


def layer_gradient_shapes(grad_out, grad_logits, grad_weights, x, router_weight, lora_a, lora_b, *rest):
    """Either layer op's backward on fake tensors: the gradients of x, the router and both factors, or empty."""
    needs = rest[-1]
    shaped = (x, router_weight, lora_a, lora_b)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(shaped, needs, strict=True)]


routed_layer_backward_op.register_fake(layer_gradient_shapes)


def save_for_layer_backward(ctx, inputs, output) -> None:
    """Either layer op's: x, the router and both factors, then what the forward returned after the output; its
    settings (the inputs after base and k)."""
    ctx.save_for_backward(*inputs[:4], *output[1:])
    ctx.settings, ctx.base_dtype = inputs[6:], inputs[4].dtype


def layer_op_gradients(backward_op, ctx, grad_out, grad_logits, grad_weights) -> tuple:
    """Either layer op's registered backward, through its backward op: one gradient per input."""
    saved = ctx.saved_tensors
    x, lora_b = saved[0], saved[3]
    needs = list(ctx.needs_input_grad[:4])
    grad_base = grad_out if ctx.needs_input_grad[4] else None
    if grad_out is None:  # only the losses' gradients: the experts' part is zero (in the base output's dtype)
        grad_out = x.new_zeros(x.shape[0], lora_b.shape[-1], dtype=ctx.base_dtype)
    grads = backward_op(grad_out.contiguous(), grad_logits, grad_weights, *saved, *ctx.settings, needs)
    unused = len(ctx.needs_input_grad) - 5
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), grad_base, *(None,) * unused


def routed_layer_op_backward(ctx, grad_out, grad_logits, grad_weights, *unused):
    return layer_op_gradients(routed_layer_backward_op, ctx, grad_out, grad_logits, grad_weights)


routed_layer_op.register_autograd(routed_layer_op_backward, setup_context=save_for_layer_backward)


# the grouped form (only the chosen experts) as custom ops: its forward also returns what the backward rebuilds
# the sort from (the gate weights and h per sorted pair, dest and offsets), as mope::grouped_lora does


@torch.library.custom_op("mope::routed_grouped_layer", mutates_args=())
def routed_grouped_layer_op(
    x: torch.Tensor, router_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.Tensor,
    k: int, temperature: float, normalise: bool, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """:class:`RoutedLayer`'s grouped forward: the output, logits, weights, chosen experts, then per sorted pair the
    gate weight and ``h``, and the sort's ``dest`` and ``offsets``."""
    logits, weights, chosen, counted = route_and_count(x, router_weight, k, temperature, normalise)
    out, state, gate, h = grouped_forward(x, lora_a, lora_b, weights, base, chosen, scaling, counted)
    return out, logits, weights, chosen, gate, h, state.groups.dest, state.groups.offsets


@routed_grouped_layer_op.register_fake
def routed_grouped_layer_shapes(x, router_weight, lora_a, lora_b, base, k, temperature, normalise, scaling):
    tokens, (num_experts, rank, _) = x.shape[0], lora_a.shape
    logits, pairs = x.new_empty(tokens, router_weight.shape[0]), tokens * k
    chosen = x.new_empty(tokens, k, dtype=torch.long)
    sort = chosen.new_empty(pairs), chosen.new_empty(num_experts + 1)
    return base.new_empty(base.shape), logits, torch.empty_like(logits), chosen, x.new_empty(pairs), \
        x.new_empty(pairs, rank), *sort  # fmt: skip


@torch.library.custom_op("mope::routed_grouped_layer_backward", mutates_args=())
def routed_grouped_layer_backward_op(
    grad_out: torch.Tensor, grad_logits: torch.Tensor | None, grad_weights: torch.Tensor | None, x: torch.Tensor,
    router_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, logits: torch.Tensor,
    weights: torch.Tensor, chosen: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, dest: torch.Tensor,
    offsets: torch.Tensor, temperature: float, normalise: bool, scaling: float, needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """:func:`chosen_expert_gradients` as an op: an empty tensor where a gradient is not needed."""
    (num_experts, rank, _), (tokens, k) = lora_a.shape, chosen.shape
    tiles = Tiles.of(num_experts, rank, x.dtype, grad_out.dtype)
    state = GroupedState(Groups(dest, offsets, gate, tokens, k), tiles, max(MIN_DOT, tiles.rp))
    grads = chosen_expert_gradients(
        grad_out, grad_logits, grad_weights, x, router_weight, lora_a, lora_b, logits, weights, chosen, gate, h,
        temperature, normalise, scaling, state, needs,
    )  # fmt: skip
    return [x.new_empty(0) if g is None else g for g in grads]


routed_grouped_layer_backward_op.register_fake(layer_gradient_shapes)


def routed_grouped_layer_op_backward(ctx, grad_out, grad_logits, grad_weights, *unused):
    return layer_op_gradients(routed_grouped_layer_backward_op, ctx, grad_out, grad_logits, grad_weights)


routed_grouped_layer_op.register_autograd(routed_grouped_layer_op_backward, setup_context=save_for_layer_backward)


@on_inputs_device
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
    n, r, d_in = lora_A.shape  # compiled: one op, the grouped form's or every expert's
    flat, base = x.reshape(-1, d_in).contiguous(), base_out.reshape(-1, base_out.shape[-1]).contiguous()
    if grouped_pays(n, k):
        factors = lora_A.contiguous(), lora_B.contiguous()
        out, logits, weights, chosen, *_ = routed_grouped_layer_op(
            flat, weight, *factors, base, k, float(temperature), normalise, scaling
        )
    else:
        a_cat, b_cat = lora_A.reshape(n * r, d_in).contiguous(), lora_B.reshape(n * r, -1).contiguous()
        out, logits, weights, chosen, _ = routed_layer_op(
            flat, weight, a_cat, b_cat, base, k, float(temperature), normalise, scaling, n
        )
    lead = x.shape[:-1]
    return out.view(*base_out.shape), logits.view(*lead, n), weights.view(*lead, n), chosen.view(*lead, k), None
