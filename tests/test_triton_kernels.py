"""dispatch='triton' (mope.kernels.lora) equals the masked strategy, on CUDA or under Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (when ``mope.kernels.lora`` is
imported) *and* at every launch, so the interpreter cannot be switched on for part of a test
process without switching it on for every Triton kernel the process meets. On a machine without
CUDA the battery therefore runs in one subprocess with ``TRITON_INTERPRET=1``
(``test_battery_under_the_interpreter_and_its_kernels_compile_for_an_h100``, slow; it then compiles
the launched kernels for an H100 without one); in this process its tests are skipped, saying so.
On CUDA (without the variable) they run here. The refusals run where the kernels cannot.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compiled_steps_without_recompiles, make_batch, make_model
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import mope
from mope.dispatch import auto_dispatch, lora_masked, lora_triton, resolve_dispatch
from mope.kernels import kernels_interpreted, triton_unavailable
from mope.kernels.interpreter import interpreter_fault
from mope.layer import MoPELayer
from mope.losses import load_balancing_loss, router_z_loss
from mope.routing import ROUTERS, RoutingInputs
from mope.routing.context import RoutingContext

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not kernels_interpreted() else "cpu")
KERNELS_RUN = HAS_TRITON and triton_unavailable(DEVICE) is None
if not HAS_TRITON:
    NOT_RUN = "triton is not installed"
elif kernels_interpreted():
    NOT_RUN = f"the interpreter cannot run the kernels here: {triton_unavailable(DEVICE)}"
else:
    NOT_RUN = "no CUDA here: these run in the TRITON_INTERPRET=1 subprocess of test_battery_under_the_interpreter_and_its_kernels_compile_for_an_h100"
battery = pytest.mark.skipif(not KERNELS_RUN, reason=NOT_RUN)
refusal = pytest.mark.skipif(KERNELS_RUN, reason="the kernels run here: nothing is refused")
KERNEL_MODULES = [f"mope.kernels.{name}" for name in ("lora", "grouped", "router", "layer_kernels", "decode")]
LAUNCHES_FILE = "MOPE_KERNEL_LAUNCHES"  # set: the battery writes its distinct interpreted launches there


@pytest.fixture(scope="module", autouse=True)
def launches_recorded():
    if not os.environ.get(LAUNCHES_FILE) or not KERNELS_RUN or not kernels_interpreted():
        yield
        return
    from kernel_specs import recorded_launches

    with recorded_launches(Path(os.environ[LAUNCHES_FILE])):
        yield


def reference_error(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Relative errors against the float64 result: the kernels', and the masked strategy's own."""
    scale = exact.double().norm().clamp_min(1e-30)
    return ((got.double() - exact.double()).norm() / scale).item(), ((want.double() - exact).norm() / scale).item()


def flat_inputs(dtype: torch.dtype, base_dtype: torch.dtype, token_dims=(24,), n=5, r=3, d_in=32, d_out=40):
    """x, lora_A, lora_B, weights, base_out (leaves): top-2 weights, a token without expert, a shared expert."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*token_dims, d_in, generator=g)
    lora_a = torch.randn(n, r, d_in, generator=g) / d_in**0.5
    lora_b = torch.randn(n, r, d_out, generator=g) / r**0.5
    values, index = torch.randn(*token_dims, n - 1, generator=g).softmax(-1).topk(2, dim=-1)
    routed = torch.zeros(*token_dims, n - 1).scatter(-1, index, values)
    routed.view(-1, n - 1)[3] = 0  # a token no routed expert takes (capacity dropped it, or padding)
    weights = torch.cat([routed, torch.ones(*token_dims, 1)], -1)  # the last expert is shared: weight 1
    weights.view(-1, n)[5] = 0  # a token with no expert at all
    base = torch.randn(*token_dims, d_out, generator=g)
    tensors = [x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), weights, base.to(base_dtype)]
    return [t.to(DEVICE).requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = fn(*inputs[:3], inputs[3], 2.0, inputs[4])
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    return [out, *torch.autograd.grad(out, inputs, upstream)]


@battery
@pytest.mark.parametrize("token_dims", [(24,), (3, 7)])
@pytest.mark.parametrize("n, r", [(5, 3), (9, 4), (3, 16)])
def test_fp32_outputs_and_every_gradient_equal_masked(token_dims, n, r):
    inputs = flat_inputs(torch.float32, torch.float32, token_dims, n, r)
    got = outputs_and_grads(resolve_dispatch("triton", inputs[0], inputs[1], 3).apply, inputs)
    want = outputs_and_grads(lora_masked, inputs)
    for name, g, w in zip(["out", "x", "lora_A", "lora_B", "weights", "base_out"], got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    out, weights, base = got[0].reshape(-1, got[0].shape[-1]), inputs[3], inputs[4]
    assert torch.equal(out[5], base.reshape(-1, base.shape[-1])[5])  # no expert: the base output, exactly
    assert got[4].reshape(-1, n)[5].abs().sum() > 0  # its weights still get a gradient (as masked's do)
    assert torch.equal(weights.reshape(-1, n)[5], torch.zeros(n, device=DEVICE))


@battery
@pytest.mark.parametrize(
    "dtype, base_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp32-experts-bf16-base"],
)
def test_bf16_is_as_close_to_float64_as_masked(dtype, base_dtype):
    """bf16 rounds differently along each path: each is compared with float64; the kernels may not be much worse.

    (Under the interpreter, stores to bf16 truncate instead of rounding to nearest: within the bound.)
    """
    inputs = flat_inputs(dtype, base_dtype)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    got = outputs_and_grads(resolve_dispatch("triton", inputs[0], inputs[1], 3).apply, inputs)
    want = outputs_and_grads(lora_masked, inputs)
    reference = outputs_and_grads(lora_masked, exact)
    for name, g, w, e in zip(
        ["out", "x", "lora_A", "lora_B", "weights", "base_out"], got, want, reference, strict=True
    ):
        assert g.dtype == w.dtype, name
        error, masked_error = reference_error(g, w, e)
        assert error < max(3 * masked_error, 1e-2), (name, error, masked_error)


def mope_layer(
    router: str, shared: int = 0, num_experts: int = 6, top_k: int = 2, widths=(16, 12), **options
) -> MoPELayer:
    config = mope.MoPEConfig(
        num_experts=num_experts, top_k=top_k, num_shared_experts=shared, r=4, init_weights=False, router=router,
        **options,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = MoPELayer(nn.Linear(*widths), "default", config).to(DEVICE)
    with torch.no_grad():  # a router scale that makes the choice non-trivial
        layer.mope_router["default"].weight.normal_(0, 1.0)
    return layer


@battery
@pytest.mark.parametrize(
    "router, shared, options",
    [
        ("top_k", 0, {}),  # router and experts in one Function (mope.kernels.layer)
        ("top_k", 0, {"router_temperature": 0.7, "num_experts": 20, "top_k": 3}),  # fused, N > 16
        ("top_k", 0, {"top_k_order": "softmax_then_topk_unnormalised"}),  # fused, the full softmax's values
        ("top_k", 1, {}),
        ("top_k", 0, {"capacity_factor": 0.3}),  # dropped tokens: some use one expert, some none
        ("switch", 0, {"capacity_factor": 0.5}),
        ("dense", 2, {}),
        ("top_k", 0, {"num_experts": 16}),  # N/k = 8: the grouped kernels
        ("top_k", 1, {"num_experts": 25, "capacity_factor": 0.3}),  # N/(k+1) = 8: grouped, shared, dropped
        ("switch", 0, {"num_experts": 9, "capacity_factor": 0.5}),  # N/k = 9: grouped top-1
    ],
    ids=[
        "top_k",
        "top_k-temperature-n20",
        "top_k-unnormalised",
        "top_k-shared",
        "top_k-capacity",
        "switch-capacity",
        "dense-shared",
        "grouped",
        "grouped-shared-capacity",
        "grouped-switch",
    ],
)
def test_layer_training_forward_equals_masked(router, shared, options):
    layer = mope_layer(router, shared, **options).train()
    x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
    bank, gate = layer.mope_experts["default"], layer.mope_router["default"]
    if "capacity_factor" in options:  # capacity must really drop something for the case to mean anything
        assert gate(x, mope.routing.RoutingInputs()).dropped.any()
    params = [x, bank.lora_A, bank.lora_B, gate.weight]
    results = {}
    for name in ("masked", "triton"):
        mope.set_dispatch(layer, name)  # the bank and a top-k router
        torch.manual_seed(3)  # random_second / noise draw the same
        out = layer(x)
        results[name] = [out, *torch.autograd.grad(out, params, torch.ones_like(out))]
    grouped = options.get("num_experts", 6) >= 8 * (1 if router == "switch" else options.get("top_k", 2) + shared)
    fused = router == "top_k" and not shared and "capacity_factor" not in options  # Switch has capacity
    expected = "RoutedLayerBackward" if fused else "GroupedLoRABackward" if grouped else "RoutedLoRABackward"
    assert kernel_node(out) == expected
    for got, want in zip(results["triton"], results["masked"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
@pytest.mark.parametrize(
    "frozen, widths, experts",
    [
        ((), (16, 80), 6),  # B's columns reach further than A's and the router's (programs past d_in idle)
        (("router",), (80, 16), 6),  # A's and the router's reach further than B's
        (("x", "A"), (16, 12), 6),  # the first adapted layer of a frozen model: no input gradient
        (("B",), (16, 12), 6),
        (("x", "A", "B"), (16, 12), 6),  # only the router learns
        ((), (16, 80), 16),  # N/k = 8: only the chosen experts
        (("router",), (80, 16), 16),
        (("x", "A"), (16, 12), 16),
    ],
    ids=[
        "wide-out", "router-frozen-wide-in", "no-x-A-frozen", "B-frozen", "router-only",
        "grouped-wide-out", "grouped-router-frozen-wide-in", "grouped-no-x-A-frozen",
    ],
)  # fmt: skip
def test_the_fused_backward_gives_what_is_needed_and_equals_masked(frozen, widths, experts, launched):
    """The fused layer's backward (over every expert, the input's and the weights' gradients share one launch whose
    programs split between x, A, B and the router; over the chosen experts the weights' share one) with parts
    frozen, at unequal input and output widths, over every expert or the chosen."""
    layer = mope_layer("top_k", widths=widths, num_experts=experts).train()
    bank, gate = layer.mope_experts["default"], layer.mope_router["default"]
    x = torch.randn(3, 30, widths[0], device=DEVICE, requires_grad="x" not in frozen)
    named = {"x": x, "A": bank.lora_A, "B": bank.lora_B, "router": gate.weight}
    for name in frozen:
        named[name].requires_grad_(False)
    trained = [t for name, t in named.items() if name not in frozen]
    results = {}
    for dispatch in ("masked", "triton"):
        mope.set_dispatch(layer, dispatch)
        out = layer(x)
        results[dispatch] = [out, *torch.autograd.grad(out.square().sum(), trained)]
    weight_gradients = "grouped_gradients" if experts == 16 else "layer_gradients"
    assert kernel_node(out) == "RoutedLayerBackward" and launched.count(weight_gradients) == 1
    for got, want in zip(results["triton"], results["masked"], strict=True):  # values up to ~1e3: fp32 sums
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@battery
def test_the_fused_layer_over_more_router_experts_than_a_step_of_the_routers_share_equals_masked(launched):
    """Top-40 of 256 (the router kernel's most), over every expert (N/k = 6.4): the router's share of the input's
    gradient, ``d W``, takes 4 steps of ``ROUTER_CHUNK`` router experts; the output and every gradient equal
    masked's."""
    from mope.kernels import ROUTER_KERNEL_MAX_EXPERTS
    from mope.kernels.lora import ROUTER_CHUNK

    n = ROUTER_KERNEL_MAX_EXPERTS
    layer = mope_layer("top_k", num_experts=n, top_k=40, widths=(16, 12)).train()
    assert n // ROUTER_CHUNK == 4
    x = torch.randn(3, 10, 16, device=DEVICE, requires_grad=True)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    results = {}
    for dispatch in ("masked", "triton"):
        mope.set_dispatch(layer, dispatch)
        out = layer(x)
        results[dispatch] = [out, *torch.autograd.grad(out.square().sum(), params)]
    assert kernel_node(out) == "RoutedLayerBackward" and launched.count("layer_gradients") == 1
    for got, want in zip(results["triton"], results["masked"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@battery
@pytest.mark.parametrize("case", ["fused", "fused-grouped", "masked-kernels", "grouped-kernels"])
def test_the_kernels_nodes_take_the_layer_input_parameters_and_router_with_no_view_between(case):
    """The token-shape views are taken inside the kernels' Functions, where autograd does not track them: a
    tracked view costs the host a few microseconds forward and again backward, per layer and step."""
    layer = mope_layer("top_k", num_experts=16 if "grouped" in case else 6).train()
    mope.set_dispatch(layer, "triton")
    if not case.startswith("fused"):  # a hook on the router: the router and the experts' Functions apart
        layer.mope_router["default"].register_forward_hook(lambda *args: None)
    x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
    experts = layer(x).grad_fn
    given = [type(node).__name__ for node, _ in experts.next_functions[:4]]
    if case.startswith("fused"):  # x, the router's weight, lora_A, lora_B
        assert type(experts).__name__ == "RoutedLayerBackward" and given == ["AccumulateGrad"] * 4
        return
    assert type(experts).__name__ == ("GroupedLoRABackward" if case == "grouped-kernels" else "RoutedLoRABackward")
    assert given == ["AccumulateGrad"] * 3 + ["RouteTopKBackward"]  # x, lora_A, lora_B, the gate's weights
    router = experts.next_functions[3][0]
    assert [type(node).__name__ for node, _ in router.next_functions[:2]] == ["AccumulateGrad"] * 2  # x, its weight


@battery
@pytest.mark.parametrize("case", ["fused", "fused-grouped", "router", "masked-kernels", "grouped-kernels"])
def test_a_backward_that_builds_a_graph_through_the_kernels_is_refused_naming_masked(case):
    """The kernels' backward is not differentiable. With ``create_graph=True`` (a gradient penalty) autograd took
    it as a constant: the experts' share of the penalty's gradient was missing (a 25th of masked's), silently.
    Each Function (the fused layer's, the router's, the experts' over every expert or the chosen) refuses it at
    once: ``once_differentiable`` would raise only where the second backward runs its node, which
    ``torch.autograd.grad(penalty, [params])`` skips. Masked gives the second-order gradient; a first-order
    backward is unchanged."""
    if case in ("fused", "fused-grouped", "router"):
        layer = mope_layer("top_k", num_experts=16 if case == "fused-grouped" else 6).train()
        gate = layer.mope_router["default"]
        x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
        leaves = [x, gate.weight, layer.mope_experts["default"].lora_B]

        def forward(dispatch: str) -> torch.Tensor:
            mope.set_dispatch(layer, dispatch)
            return gate(x).weights if case == "router" else layer(x)
    else:  # the experts' Functions alone: every expert, or only the chosen
        leaves = flat_inputs(torch.float32, torch.float32, (24,), 17 if case == "grouped-kernels" else 5, 4)
        chosen, kernels = chosen_of(leaves[3]), grouped_lora if case == "grouped-kernels" else lora_triton

        def forward(dispatch: str) -> torch.Tensor:
            return (lora_masked if dispatch == "masked" else kernels)(*leaves[:4], 2.0, leaves[4], chosen)

    def penalised(dispatch: str) -> tuple[torch.Tensor | None, ...]:
        loss = forward(dispatch).square().sum()
        (grad_x,) = torch.autograd.grad(loss, leaves[:1], create_graph=True)
        return torch.autograd.grad(loss + grad_x.square().sum(), leaves[1:], allow_unused=True)

    assert any(g is not None and g.abs().sum() > 0 for g in penalised("masked"))
    with pytest.raises(RuntimeError, match=r"dispatch='triton' gives no second-order gradients.*dispatch='masked'"):
        penalised("triton")
    assert torch.autograd.grad(forward("triton").sum(), leaves[:1])[0].abs().sum() > 0


@battery
@pytest.mark.parametrize(
    "case", ["plain", "eval", "grouped", "hooked", "shared", "capacity", "dropout", "masked", "bf16-experts", "noise"]
)
def test_the_router_and_experts_share_one_function_only_where_it_computes_what_the_two_modules_do(case):
    """Elsewhere the layer routes and applies the experts apart, as before; either way masked's values."""
    options = {
        "shared": {"shared": 1},
        "capacity": {"capacity_factor": 0.5},
        "dropout": {"lora_dropout": 0.1},
        "grouped": {"num_experts": 16},
        "noise": {"router_noise": True},
    }.get(case, {})
    layer = mope_layer("top_k", **options).train(case != "eval")
    if case == "hooked":  # e.g. an analysis collector reading the router's output
        layer.mope_router["default"].register_forward_hook(lambda *args: None)
    if case == "bf16-experts":
        layer.mope_experts["default"].to(torch.bfloat16)
    x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
    mope.set_dispatch(layer, "masked")
    torch.manual_seed(3)
    want = layer(x)
    mope.set_dispatch(layer, "masked" if case == "masked" else "triton")
    fused = case in ("plain", "eval", "grouped")
    assert layer.fuses("default", x) is fused
    torch.manual_seed(3)
    got = layer(x)
    assert (kernel_node(got) == "RoutedLayerBackward") is fused
    if case not in ("dropout", "bf16-experts"):  # dropout draws its own masks; bf16 rounds otherwise
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
def test_a_layer_that_fused_takes_its_full_path_again_wherever_what_its_fused_check_holds_changed():
    """The next call after a fused one skips MoPELayer.fuses (FusedCheck): in every state below it must take the
    path and give the values the full path does, and the changes that stop fusing must stop it."""
    config = mope.MoPEConfig(num_experts=6, top_k=2, r=4, init_weights=False, dispatch="triton", router_noise=True)
    layer = mope_layer("top_k", router_noise=True, dispatch="triton").eval()
    layer.update_layer("second", config)
    layer.to(DEVICE)
    x = torch.randn(4, 9, 16, device=DEVICE)
    bank, router = layer.mope_experts["default"], layer.mope_router["default"]

    def call(full: bool) -> tuple[str, torch.Tensor]:
        if full:
            layer.fused_check = None
        torch.manual_seed(5)  # the noisy router's draw in training
        out = layer(x.clone().requires_grad_())
        return kernel_node(out), out.detach()

    hooks: list = []
    states = [  # (what changes, undo, whether it still fuses)
        (lambda: None, lambda: None, True),
        (lambda: hooks.append(router.register_forward_hook(lambda *a: None)), lambda: hooks.pop().remove(), False),
        (lambda: hooks.append(bank.register_forward_pre_hook(lambda *a: None)), lambda: hooks.pop().remove(), False),
        (
            lambda: hooks.append(nn.modules.module.register_module_forward_hook(lambda *a: None)),
            lambda: hooks.pop().remove(),
            False,
        ),
        (lambda: mope.set_dispatch(layer, "masked"), lambda: mope.set_dispatch(layer, "triton"), False),
        (lambda: bank.to(torch.bfloat16), lambda: bank.float(), False),
        (lambda: layer.train(), lambda: layer.eval(), False),  # the router's noise is drawn in training
        (lambda: layer.enable_adapters(False), lambda: layer.enable_adapters(True), False),
        (lambda: layer.set_adapter("second"), lambda: layer.set_adapter("default"), True),  # the other one fuses
        (lambda: layer.set_adapter(["default", "second"]), lambda: layer.set_adapter("default"), False),
    ]
    for index, (change, undo, fuses) in enumerate(states):
        assert call(full=True)[0] == "RoutedLayerBackward" and layer.fused_check is not None, index
        change()
        fast_node, fast = call(full=False)
        full_node, full = call(full=True)
        assert fast_node == full_node and (fast_node == "RoutedLayerBackward") is fuses, (index, fast_node)
        torch.testing.assert_close(fast, full, rtol=0, atol=0)
        undo()
    assert call(full=True)[0] == "RoutedLayerBackward"
    other = copy.deepcopy(bank)  # the same name now names another bank (set by hand: update_layer resets the check)
    with torch.no_grad():
        other.lora_B.mul_(-2.0)
    layer.mope_experts["default"] = other
    fast_node, fast = call(full=False)
    assert fast_node == "RoutedLayerBackward" and layer.fused_check.bank is other
    torch.testing.assert_close(fast, call(full=True)[1], rtol=0, atol=0)
    layer.update_layer("third", config)
    assert layer.fused_check is None
    call(full=False)
    assert layer.fused_check is not None
    layer.delete_adapter("second")  # not kept alive by the check
    assert layer.fused_check is None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_a_fused_check_rechecks_the_kernels_on_each_gpu_not_once_a_device_type(monkeypatch):
    """A machine may mix GPUs the kernels run on with ones they refuse (an A100 beside a T4): a layer that fused on
    cuda:0 must not fuse on cuda:1 by its kept check. Stand-ins for the GPUs' inputs; nothing is launched."""
    from types import SimpleNamespace

    import mope.layer

    layer = mope_layer("top_k", dispatch="triton")
    asked = []

    def unavailable(device):
        asked.append(device)
        return None if device == torch.device("cuda", 0) else "cuda:1 (Tesla T4) has 7.5"

    monkeypatch.setattr(mope.layer, "triton_unavailable", unavailable)
    check = mope.layer.FusedCheck(layer, "default")
    on = {i: SimpleNamespace(device=torch.device("cuda", i), numel=lambda: 8) for i in (0, 1)}
    assert [check.holds(layer, on[i]) for i in (0, 0, 1, 0)] == [True, True, False, True]
    assert asked == [torch.device("cuda", i) for i in (0, 1)]  # asked again only where the GPU was not the last one


def kernel_node(out: torch.Tensor) -> str:
    """The autograd node of the expert kernels that made ``out`` (through the views of its token shape)."""
    node = out.grad_fn
    while node is not None and type(node).__name__.startswith(("View", "Unsafe")):
        node = node.next_functions[0][0]
    return type(node).__name__


def chosen_of(weights: torch.Tensor) -> torch.Tensor:
    """flat_inputs' experts as a gate lists them: the routed top-2 (also where the weights are 0), then the shared."""
    n = weights.shape[-1]
    routed = weights[..., : n - 1].detach().topk(2, dim=-1).indices
    return torch.cat([routed, torch.full_like(routed[..., :1], n - 1)], -1)


def with_chosen(fn, inputs: list[torch.Tensor], chosen: torch.Tensor) -> list[torch.Tensor]:
    out = fn(*inputs[:3], inputs[3], 2.0, inputs[4], chosen)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    return [out, *torch.autograd.grad(out, inputs, upstream)]


def at_chosen(results: list[torch.Tensor], chosen: torch.Tensor) -> list[torch.Tensor]:
    """masked's results with the weights' gradient kept at the chosen experts only (masked gives every one)."""
    listed = torch.zeros_like(results[4], dtype=torch.bool).scatter(-1, chosen, True)
    return [*results[:4], torch.where(listed, results[4], 0), results[5]]


def grouped_lora(*args) -> torch.Tensor:
    from mope.kernels.grouped import grouped_lora as kernels  # imports Triton: only where the battery runs

    return kernels(*args)


@battery
@pytest.mark.parametrize("token_dims, n, r", [((24,), 5, 3), ((3, 7), 9, 4), ((70,), 17, 16)])
def test_grouped_fp32_outputs_and_every_gradient_equal_masked(token_dims, n, r):
    """Only the chosen experts: a token with no routed expert, one with none at all, a shared expert, 70 tokens
    (more than one block of pairs), and experts no token chose."""
    inputs = flat_inputs(torch.float32, torch.float32, token_dims, n, r)
    chosen = chosen_of(inputs[3])
    got = with_chosen(grouped_lora, inputs, chosen)
    want = at_chosen(with_chosen(lora_masked, inputs, chosen), chosen)
    for name, g, w in zip(["out", "x", "lora_A", "lora_B", "weights", "base_out"], got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=3e-5, msg=name)
    flat_out, flat_base = got[0].reshape(-1, got[0].shape[-1]), inputs[4].reshape(-1, got[0].shape[-1])
    assert torch.equal(flat_out[5], flat_base[5])  # no expert: the base output, exactly


@battery
def test_the_grouped_forward_over_several_column_spans_equals_masked(monkeypatch):
    """Each program of the grouped forward takes a span of the output's columns, computing its block's h again
    (the first span stores it): 150 columns in spans of 64, 64 and 22."""
    from mope.kernels import grouped

    monkeypatch.setattr(grouped, "COLUMN_SPAN", 64)
    inputs = flat_inputs(torch.float32, torch.float32, (3, 7), 9, 4, d_out=150)
    chosen = chosen_of(inputs[3])
    got = with_chosen(grouped_lora, inputs, chosen)
    want = at_chosen(with_chosen(lora_masked, inputs, chosen), chosen)
    for name, g, w in zip(["out", "x", "lora_A", "lora_B", "weights", "base_out"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=3e-5, msg=name)


@battery
@pytest.mark.parametrize("tokens, k, n", [(300, 2, 40), (5, 3, 9), (1, 1, 1), (1000, 2, 300)])
def test_groups_sort_the_pairs_stably_by_expert(tokens, k, n):
    """The counting sort equals torch's stable sort: pairs, offsets and gate weights. Half the experts chosen
    by no token; 600 pairs are five blocks of the counting kernels at N=40, 2000 pairs at N=300 (512 padded)
    are 125."""
    from mope.kernels.grouped import sort_pairs  # imports Triton: only where the battery runs

    g = torch.Generator().manual_seed(0)
    chosen = torch.stack([torch.randperm(max(k, n // 2), generator=g)[:k] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, n, generator=g).to(DEVICE)
    groups = sort_pairs(chosen, weights)
    expert, dest = torch.sort(chosen.reshape(-1), stable=True)
    counts = torch.bincount(chosen.reshape(-1), minlength=n)
    assert torch.equal(groups.dest, dest)
    assert torch.equal(groups.offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    assert torch.equal(groups.gate, weights[dest // k, expert])


@battery
@pytest.mark.parametrize("tokens, k", [(100, 3), (64, 2)])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "running-sums"])
def test_the_routers_counts_sort_the_pairs_as_the_counting_kernel_does(tokens, k, scan, monkeypatch):
    """The router's launch counts each block's pairs (32 tokens: 96 pairs at k = 3, not a power of two; 100 tokens
    end in a partial block), and the sort from those counts equals torch's stable sort, whether its programs scan
    the counts or (many blocks; here forced) read their running sums."""
    from mope.kernels import grouped
    from mope.kernels.grouped import sort_pairs
    from mope.kernels.router import route

    monkeypatch.setattr(grouped, "SCAN_BLOCKS", grouped.SCAN_BLOCKS if scan else 1)

    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(tokens, 24, generator=g).to(DEVICE), torch.randn(40, 24, generator=g).to(DEVICE)
    _, weights, chosen, counted = route(x, weight, k, 1.0, True, counts=True)
    groups = sort_pairs(chosen, weights, counted)
    expert, dest = torch.sort(chosen.reshape(-1), stable=True)
    counts = torch.bincount(chosen.reshape(-1), minlength=40)
    assert torch.equal(groups.dest, dest)
    assert torch.equal(groups.offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    assert torch.equal(groups.gate, weights[dest // k, expert])


@battery
def test_grouped_bf16_is_as_close_to_float64_as_masked():
    inputs = flat_inputs(torch.bfloat16, torch.bfloat16, (3, 7), 9, 4)
    chosen = chosen_of(inputs[3])
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    got = with_chosen(grouped_lora, inputs, chosen)
    want = at_chosen(with_chosen(lora_masked, inputs, chosen), chosen)
    reference = at_chosen(with_chosen(lora_masked, exact_inputs, chosen), chosen)
    for name, g, w, e in zip(
        ["out", "x", "lora_A", "lora_B", "weights", "base_out"], got, want, reference, strict=True
    ):
        assert g.dtype == w.dtype, name
        error, masked_error = reference_error(g, w, e)
        assert error < max(3 * masked_error, 1e-2), (name, error, masked_error)


@battery
@pytest.mark.parametrize("num_experts", [6, 16], ids=["every-expert", "grouped"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_the_router_launchs_loss_sums_and_their_gradient_equal_the_losses_over_the_logits(num_experts, masked):
    """LossSums over 150 tokens: several blocks of rows (64 rows every expert, 32 grouped) and a partial last one.
    The load-balancing and z-losses from the sums, and their gradients into x and the router, equal the losses
    computed over the returned logits in torch (softmax, logsumexp, the chosen experts' one-hot)."""
    from mope.kernels.layer import routed_layer
    from mope.losses import LossSums, summed, token_weights

    torch.manual_seed(0)
    tokens, width, rank, k = 150, 24, 4, 2
    x = torch.randn(tokens, width, device=DEVICE, requires_grad=True)
    router = (torch.randn(num_experts, width, device=DEVICE) * 0.5).requires_grad_()
    lora_a, lora_b = (torch.randn(num_experts, rank, n, device=DEVICE) * 0.1 for n in (width, 20))
    base = torch.randn(tokens, 20, device=DEVICE)
    mask = (torch.rand(tokens, device=DEVICE) > 0.3).long() if masked else None
    weights = token_weights(mask, torch.float32)

    sums = LossSums(weights)
    _, logits, _, chosen, stats = routed_layer(x, router, lora_a, lora_b, base, k, 0.8, True, 2.0, sums)
    assert stats.shape == (-(-tokens // sums.rows), 2 * num_experts + 1) and stats.shape[0] > 2
    sums.stats = stats
    prob, share, z = summed([sums], None)
    block = torch.arange(stats.shape[0], device=DEVICE, dtype=torch.float32)  # a loss that tells the blocks apart
    expert = torch.arange(num_experts, device=DEVICE, dtype=torch.float32)
    got = [
        num_experts * (share.detach() * prob).sum(),
        z.sum(),
        (stats[:, :num_experts] @ expert * block).sum() + (stats[:, -1] * block).sum(),
    ]

    w = weights if masked else torch.full((tokens,), 1.0 / tokens, device=DEVICE)
    load = torch.zeros_like(logits).scatter(-1, chosen, 1.0 / k)
    probs, lse = torch.softmax(logits, -1), torch.logsumexp(logits, -1)
    token_block = (torch.arange(tokens, device=DEVICE) // sums.rows).float()
    want = [
        num_experts * torch.dot(w @ load, w @ probs),
        torch.dot(w, lse.square()),
        (token_block * w * (probs @ expert)).sum() + (token_block * w * lse.square()).sum(),
    ]
    for g, v in zip(got, want, strict=True):
        torch.testing.assert_close(g, v, rtol=1e-5, atol=1e-6)
    for g, v in zip(got, want, strict=True):
        got_grads = torch.autograd.grad(g, (x, router), retain_graph=True)
        want_grads = torch.autograd.grad(v, (x, router), retain_graph=True)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert b.abs().max() > 1e-3  # the loss reaches both
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@battery
@pytest.mark.parametrize("num_experts", [6, 16], ids=["every-expert", "grouped"])
@pytest.mark.parametrize("summing", [False, True], ids=["no-sums", "sums"])
def test_the_layer_call_without_routing_outputs_gives_the_same_output_stats_and_gradients(num_experts, summing):
    """``routing=False`` (nothing reads the logits, weights and chosen experts, so the Function does not return
    them): the output in the base's shape, the loss sums and every gradient, each in its input's shape, equal
    ``routing=True``'s; over tokens in a ``[batch, seq]`` shape."""
    from mope.kernels.layer import routed_layer
    from mope.losses import LossSums

    torch.manual_seed(0)
    width, rank, k, out_width = 24, 4, 2, 20
    x = torch.randn(2, 35, width, device=DEVICE, requires_grad=True)
    router = (torch.randn(num_experts, width, device=DEVICE) * 0.5).requires_grad_()
    lora_a, lora_b = ((torch.randn(num_experts, rank, n, device=DEVICE) * 0.1).requires_grad_() for n in (width, 20))
    base = torch.randn(2, 35, out_width, device=DEVICE, requires_grad=True)
    inputs = (x, router, lora_a, lora_b, base)
    mix = torch.linspace(-1, 1, out_width, device=DEVICE)
    results = {}
    for routing in (True, False):
        sums = LossSums(None) if summing else None
        out, logits, weights, chosen, stats = routed_layer(*inputs, k, 0.8, True, 2.0, sums, routing)
        assert out.shape == base.shape and (stats is not None) is summing
        if routing:
            assert logits.shape == weights.shape == (2, 35, num_experts) and chosen.shape == (2, 35, k)
        else:
            assert logits is None and weights is None and chosen is None
        loss = (out * mix).sum() + (stats.square().sum() if summing else 0)
        grads = torch.autograd.grad(loss, inputs)
        assert [g.shape for g in grads] == [t.shape for t in inputs]
        results[routing] = (out, stats, grads)
    (out, stats, grads), (out_bare, stats_bare, grads_bare) = results[True], results[False]
    torch.testing.assert_close(out_bare, out, rtol=0, atol=0)
    if summing:
        torch.testing.assert_close(stats_bare, stats, rtol=0, atol=0)
    for bare, full in zip(grads_bare, grads, strict=True):
        assert full.abs().max() > 0
        torch.testing.assert_close(bare, full, rtol=0, atol=0)


@battery
@pytest.mark.parametrize("num_experts", [6, 16], ids=["every-expert", "grouped"])
def test_the_layer_call_on_strided_inputs_equals_it_on_contiguous_copies(num_experts):
    """Inputs and base outputs that are not contiguous (a transposed batch) are copied before the kernels read
    them: the output and every gradient equal those of contiguous copies; the same for the decoding kernel."""
    from mope.kernels.decode import routed_decode
    from mope.kernels.layer import routed_layer

    torch.manual_seed(0)
    width, rank, k, out_width = 24, 4, 2, 20
    x_rows = torch.randn(35, 2, width, device=DEVICE, requires_grad=True)
    base_rows = torch.randn(35, 2, out_width, device=DEVICE, requires_grad=True)
    router = torch.randn(num_experts, width, device=DEVICE) * 0.5
    lora_a, lora_b = ((torch.randn(num_experts, rank, n, device=DEVICE) * 0.1).requires_grad_() for n in (width, 20))
    mix = torch.linspace(-1, 1, out_width, device=DEVICE)
    x, base = x_rows.transpose(0, 1), base_rows.transpose(0, 1)  # [2, 35, ...], strided
    assert not x.is_contiguous() and not base.is_contiguous()
    out = routed_layer(x, router, lora_a, lora_b, base, k, 1.0, True, 2.0)[0]
    grads = torch.autograd.grad((out * mix).sum(), (x_rows, base_rows, lora_a, lora_b))
    x_copy, base_copy = (t.detach().contiguous().requires_grad_() for t in (x, base))
    want = routed_layer(x_copy, router, lora_a, lora_b, base_copy, k, 1.0, True, 2.0)[0]
    want_grads = torch.autograd.grad((want * mix).sum(), (x_copy, base_copy, lora_a, lora_b))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], want_grads[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(grads[1], want_grads[1].transpose(0, 1), rtol=0, atol=0)
    for got, expected in zip(grads[2:], want_grads[2:], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():
        few, few_base = x[:, :3], base[:, :3]  # [2, 3, ...], strided
        assert not few.is_contiguous()
        decoded = routed_decode(few, router, lora_a, lora_b, few_base, k, 1.0, True, 2.0)
        expected = routed_decode(few.contiguous(), router, lora_a, lora_b, few_base.contiguous(), k, 1.0, True, 2.0)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)


def sliced(t: torch.Tensor) -> torch.Tensor:
    """A leaf with ``t``'s values whose rows lie twice their width apart: a slice of a wider tensor, as a
    parametrization may return a factor (its ``reshape`` to ``[N*r, D]`` is then a strided view, not a copy)."""
    wide = torch.cat([t.detach(), torch.full_like(t, 9.0)], -1)
    return wide[..., : t.shape[-1]].requires_grad_()


@battery
@pytest.mark.parametrize("operand", [1, 2, 4], ids=["lora_A", "lora_B", "base_out"])
@pytest.mark.parametrize("n", [5, 17], ids=["every-expert", "grouped"])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "custom-op"])
def test_the_experts_kernels_on_sliced_factors_or_base_outputs_equal_masked(operand, n, compiling, monkeypatch):
    """The kernels read contiguous rows: a factor or base output whose rows lie further apart is copied first, in
    the eager Functions and on the compiled graph's path (its custom ops, called here eagerly); the output and
    every gradient equal masked's."""
    inputs = flat_inputs(torch.float32, torch.float32, (24,), n, 4)
    inputs[operand] = sliced(inputs[operand])
    assert not inputs[operand].is_contiguous()
    if n == 5:
        want = outputs_and_grads(lora_masked, inputs)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        got = outputs_and_grads(resolve_dispatch("triton", inputs[0], inputs[1], 3).apply, inputs)
    else:
        chosen = chosen_of(inputs[3])
        want = at_chosen(with_chosen(lora_masked, inputs, chosen), chosen)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        got = with_chosen(grouped_lora, inputs, chosen)
    for name, g, w in zip(["out", "x", "lora_A", "lora_B", "weights", "base_out"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=3e-5, msg=name)


@battery
@pytest.mark.parametrize("num_experts", [6, 16], ids=["every-expert", "grouped"])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "custom-op"])
def test_the_fused_layer_on_sliced_factors_equals_it_on_contiguous_copies(num_experts, compiling, monkeypatch):
    """The fused layer's Function and its compiled graph's op (called here eagerly) copy sliced factors before the
    kernels read their rows: the output and the factors' gradients equal those of contiguous copies."""
    from mope.kernels.layer import routed_layer

    torch.manual_seed(0)
    x, base = torch.randn(20, 24, device=DEVICE), torch.randn(20, 20, device=DEVICE)
    router = torch.randn(num_experts, 24, device=DEVICE) * 0.5
    factors = [(torch.randn(num_experts, 4, n, device=DEVICE) * 0.1).requires_grad_() for n in (24, 20)]
    views = [sliced(f) for f in factors]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    results = []
    for lora_a, lora_b in (factors, views):
        out = routed_layer(x, router, lora_a, lora_b, base, 2, 1.0, True, 2.0)[0]
        results.append([out, *torch.autograd.grad(out.square().sum(), [lora_a, lora_b])])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# offsets past 2^31 elements ----------------------------------------------------------------------
# A row index times a width is an element's offset; at LLM sizes (65,536 tokens x 32,768 columns) it passes 2^31,
# where int32 arithmetic wraps, in the interpreter as on a GPU (there: a wrong address, here: a crash). Kernels
# that large cannot run whole in the interpreter, so there each launch runs only the programs at its grid's edges
# (edge_programs), on tensors of which only the last rows are ever written: the rest takes no memory. On CUDA
# every program runs (at most about 17 GB of GPU memory, estimated from the tensors' sizes).


def tall(wide: int, width: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """``[2^31 / wide + 64, width]``, whose last 64 rows start at element 2^31 where ``width == wide``: random
    there, zeros elsewhere (on CPU never written: fresh pages take no memory and read as zeros)."""
    fill = torch.empty if DEVICE.type == "cpu" else torch.zeros
    t = fill((1 << 31) // wide + 64, width, dtype=dtype, device=DEVICE)
    t[-64:] = torch.randn(64, width, generator=torch.Generator().manual_seed(seed)).to(t)
    return t


def run_columns(t: torch.Tensor, wide: int) -> torch.Tensor:
    """``t``'s last 64 columns where it is ``wide`` wide (those the last programs of a launch write), else all."""
    return t[..., -64:] if t.shape[-1] == wide else t


@pytest.fixture
def edge_programs(monkeypatch):
    """In the interpreter, each launch runs only the programs whose index on axis 0 (the rows' blocks, of tokens or
    pairs) is one of the last two, and on the other axes (columns, experts) the first or one of the last two; the
    others' outputs stay unwritten. On CUDA, nothing changes."""
    if DEVICE.type != "cpu":
        return
    from triton.runtime import interpreter

    builder, init = interpreter.interpreter_builder, interpreter.GridExecutor.__init__
    set_dims, set_index = builder.set_grid_dim, builder.set_grid_idx
    grid: list[int] = []
    chosen: list[list[int]] = []

    def fewer(self, fn, arg_names, full, *rest):
        init(self, fn, arg_names, full, *rest)
        grid[:] = (*full, 1, 1)[:3]
        chosen[:] = [sorted({0 if axis else n - 1, max(0, n - 2), n - 1}) for axis, n in enumerate(grid)]
        self.grid = tuple(len(indices) for indices in chosen)  # the loop runs these; the kernel sees the full grid

    monkeypatch.setattr(interpreter.GridExecutor, "__init__", fewer)
    monkeypatch.setattr(builder, "set_grid_dim", lambda *_: set_dims(*grid))
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_index(chosen[0][x], chosen[1][y], chosen[2][z]))


@battery
@pytest.mark.parametrize(
    "wide, num_experts, rank", [("input", 8, 4), ("output", 8, 4), ("output", 12, 8)],
    ids=["wide-input", "wide-output", "two-expert-tiles"],
)  # fmt: skip
def test_the_layer_on_rows_past_two_to_the_31_elements_equals_it_on_those_rows_alone(
    wide, num_experts, rank, edge_programs
):  # fmt: skip
    """The fused layer over every expert (top-2 of 8 or 12), one side 2^13 columns wide, over 2^18 + 64 tokens: the
    output, logits, weights, chosen experts and the input's gradient at the last 64 rows (past 2^31 elements) equal
    the layer's on those 64 rows alone; with one tile of experts or two (the backward's launches differ).

    The grouped form cannot run this way (its sort needs every block's counts); its kernels index pairs and rows in
    int64 from the sort's own indices, and its router is tested below."""
    from mope.kernels.layer import routed_layer

    wide_width = 1 << 13
    d_in, d_out = (wide_width, 64) if wide == "input" else (64, wide_width)
    g = torch.Generator().manual_seed(1)
    router = (torch.randn(num_experts, d_in, generator=g) / d_in**0.5).to(DEVICE)
    lora_a, lora_b = ((torch.randn(num_experts, rank, n, generator=g) / n**0.25).to(DEVICE) for n in (d_in, d_out))
    x = tall(wide_width, d_in, seed=2).requires_grad_()
    base, grad_out = (tall(wide_width, d_out, torch.bfloat16, seed) for seed in (3, 4))
    results = []
    for rows in (slice(None), slice(-64, None)):
        inputs = x[rows].detach().requires_grad_() if rows.start else x, base[rows]
        out, *routing, _ = routed_layer(inputs[0], router, lora_a, lora_b, inputs[1], 2, 1.0, True, 2.0)
        (grad_x,) = torch.autograd.grad(out, inputs[0], grad_out[rows])
        results.append([run_columns(t[-64:], wide_width) for t in (out, *routing, grad_x)])
    for got, want in zip(*results, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@battery
def test_the_router_kernel_on_rows_past_two_to_the_31_elements_equals_it_on_those_rows_alone(edge_programs):
    """The router's own launches (:func:`mope.kernels.router.route` and the input's gradient of
    :func:`~mope.kernels.router.route_gradients`, as the grouped layer and an unfused router run them) over 2^18 + 64
    tokens of 2^13 columns: the logits, weights, chosen experts, the counts of each block's pairs and the input's
    gradient at the last 64 rows equal the router's on those rows alone."""
    from mope.kernels.router import route, route_gradients

    x = tall(1 << 13, 1 << 13, seed=7)
    g = torch.Generator().manual_seed(8)
    weight = (torch.randn(16, 1 << 13, generator=g) / 2**6.5).to(DEVICE)
    grad_weights = torch.randn(x.shape[0], 16, generator=g).to(DEVICE)
    results = []
    for rows in (slice(None), slice(-64, None)):
        logits, weights, chosen, (counts, _) = route(x[rows], weight, 2, 1.0, True, counts=True)
        grad_x, _ = route_gradients(
            None, grad_weights[rows], x[rows], weight, logits, weights, chosen, 1.0, True, [True, False]
        )  # fmt: skip
        results.append([logits[-64:], weights[-64:], chosen[-64:], counts[-2:], grad_x[-64:]])  # 32 tokens a block
    for got, want in zip(*results, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@battery
def test_weight_gradients_over_rows_past_two_to_the_31_elements_equal_them_over_those_rows_alone(edge_programs):
    """The token loops of A's/B's gradient (:func:`mope.kernels.lora.outer`) and the router's
    (:func:`mope.kernels.router.scores_outer`), over 2^14 + 64 rows of 2^17 columns with only the last 64 rows
    nonzero in the small operands: the columns run equal the sums over those 64 rows alone."""
    from mope.kernels import router as router_kernels
    from mope.kernels.grid import cdiv
    from mope.kernels.lora import Tiles, outer

    tiles = Tiles.of(8, 4, torch.float32)
    wide = 1 << 17
    y = tall(wide, wide, seed=6)
    p, gate, d = (torch.zeros(y.shape[0], n, device=DEVICE) for n in (32, 8, 8))
    g = torch.Generator().manual_seed(5)
    for t in (p, gate, d):
        t[-64:] = torch.randn(64, t.shape[1], generator=g)

    def scores(rows: slice) -> torch.Tensor:
        out = y.new_empty(8, wide)
        router_kernels.scores_outer[(cdiv(wide, router_kernels.BLOCK),)](
            d[rows], y[rows], out, d[rows].shape[0], wide, 8, NP=16, BT=router_kernels.BLOCK, BN=router_kernels.BLOCK
        )  # fmt: skip
        return out

    for product in (lambda rows: outer(p[rows], gate[rows], y[rows], 0.5, tiles, torch.float32), scores):
        got, want = (run_columns(product(rows), wide) for rows in (slice(None), slice(-64, None)))
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@battery
def test_a_parametrized_router_weight_reaches_the_fused_layer():
    """A router weight under ``torch.nn.utils.parametrize`` (a property, not in the router's parameter dict): the
    fused layer reads the parametrized value, and its output and the original weight's gradient equal masked's."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    layer = mope_layer("top_k").train()
    router = layer.mope_router["default"]
    parametrize.register_parametrization(router, "weight", Doubled())
    x = torch.randn(3, 5, 16, device=DEVICE)
    results = {}
    for dispatch in ("masked", "triton"):
        mope.set_dispatch(layer, dispatch)
        out = layer(x)
        results[dispatch] = [out, *torch.autograd.grad(out.square().sum(), router.parametrizations.weight.original)]
    assert kernel_node(out) == "RoutedLayerBackward"
    for got, want in zip(results["triton"], results["masked"], strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@battery
@pytest.mark.parametrize(
    "num_experts, losses",
    [(8, "importance"), (16, "importance"), (8, "summed"), (16, "summed"), (8, "summed-no-mask")],
    ids=["masked-kernels", "grouped-kernels", "masked-kernels-summed", "grouped-kernels-summed", "no-mask-summed"],
)
def test_llama_training_steps_equal_masked(num_experts, losses):
    """Two SGD steps of a tiny Llama (all linear layers, top-2, aux losses on): logits, loss and gradients. With the
    importance loss (reading the gate weights: a gradient into the fused layer's weights output) the layers record
    their routing; with only the default losses (load balancing and z-loss, ``summed``) the router kernel sums what
    they need per token (mope.losses.LossSums) and its backward adds their gradient. The grouped kernels are
    slow in the interpreter: their case adapts two projections."""
    targets = "all-linear" if num_experts == 8 else ["q_proj", "v_proj"]
    config = dict(
        task_type="CAUSAL_LM", target_modules=targets, num_experts=num_experts, top_k=2, r=4, init_weights=False,
        z_loss_coef=0.01, **({"importance_loss_coef": 0.1} if losses == "importance" else {}),
    )  # fmt: skip
    models = {name: get_peft_model(make_model("llama"), mope.MoPEConfig(**config, dispatch=name)).to(DEVICE)
              for name in ("masked", "triton")}  # fmt: skip
    batch = {k: v.to(DEVICE) for k, v in make_batch("llama", batch=2, seq=8, pad=3).items()}
    if losses == "summed-no-mask":
        del batch["attention_mask"]
    recorded = []
    context = models["triton"].base_model.routing_context
    record = context.record
    context.record = lambda r: (recorded.append(type(r.routing).__name__), record(r))
    optimizers = {n: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for n, m in models.items()}
    for _ in range(2):
        results = {}
        for name, model in models.items():
            model.train()
            optimizers[name].zero_grad()
            out = model(**batch)
            out.loss.backward()
            results[name] = (out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
            optimizers[name].step()
        (got, got_grads), (want, want_grads) = results["triton"], results["masked"]
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
        assert got_grads.keys() == want_grads.keys()
        for n, grad in want_grads.items():
            torch.testing.assert_close(got_grads[n], grad, atol=1e-5, rtol=1e-4, msg=n)
    assert set(recorded) == {"LossSums" if losses.startswith("summed") else "Routing"}


@battery
def test_fused_layers_with_summed_losses_under_gradient_checkpointing_give_the_same_gradients():
    """Non-reentrant checkpointing recomputes each fused layer (a new LossSums there, not recorded) in the backward,
    whose nodes are the first forward's: the same loss, aux loss and gradients as without it, twice in a row."""

    def run(checkpointing: bool):
        base = make_model("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = mope.MoPEConfig(
            task_type="CAUSAL_LM", target_modules="all-linear", num_experts=8, top_k=2, r=4, init_weights=False,
            z_loss_coef=0.01, dispatch="triton",
        )  # fmt: skip
        model = get_peft_model(base, config).to(DEVICE).train()
        batch = {k: v.to(DEVICE) for k, v in make_batch("llama", batch=2, seq=8, pad=3).items()}
        context = model.base_model.routing_context
        record = context.record
        context.record = lambda r: (recorded.append(type(r.routing).__name__), record(r))
        results = []
        for _ in range(2):
            model.zero_grad()
            out = model(**batch)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((out.loss.detach(), out.aux_loss.detach(), grads))
        return results

    recorded: list[str] = []

    checkpointed = run(True)
    assert set(recorded) == {"LossSums"}
    for (loss, aux, grads), (want_loss, want_aux, want_grads) in zip(checkpointed, run(False), strict=True):
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(aux, want_aux, rtol=1e-6, atol=1e-7)
        assert grads.keys() == want_grads.keys() and any("mope_router" in n for n in grads)
        for n, grad in want_grads.items():
            torch.testing.assert_close(grads[n], grad, rtol=1e-5, atol=1e-6, msg=n)


@battery
def test_compiled_training_steps_with_the_fused_layer_do_not_recompile_for_new_batches_or_eager_calls_between():
    compiled_steps_without_recompiles("triton", DEVICE.type)


def loss_and_grads(step, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = step(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# on CUDA inductor compiles the graph; under the interpreter aot_eager traces forward and backward (the
# custom ops' shapes and registered gradients) and runs them eagerly, as inductor would need a C++ build
COMPILER = "inductor" if DEVICE.type == "cuda" else "aot_eager"


def compiled_and_eager(num_experts: int, launched: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A triton layer's output and every gradient, compiled with ``fullgraph=True`` (a graph break is an error)
    and eager; ``launched`` then holds the compiled call's kernels only."""
    layer = mope_layer("top_k", num_experts=num_experts).train()
    bank, gate = layer.mope_experts["default"], layer.mope_router["default"]
    mope.set_dispatch(layer, "triton")  # the router kernel's op too
    x = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    params = [x, bank.lora_A, bank.lora_B, gate.weight]

    def outputs_and_grads(forward):
        out = forward(x)
        return [out, *torch.autograd.grad(out, params, torch.ones_like(out))]

    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(layer, backend=COMPILER, fullgraph=True))  # backward traced too
    compiled_launches = list(launched)
    eager = outputs_and_grads(layer)
    launched[:] = compiled_launches
    return compiled, eager


@battery
def test_layer_training_step_compiles_as_one_graph_and_equals_eager(launched):
    """Every expert: the layer's one custom op (mope::routed_layer), with the fused backward's launches."""
    compiled, eager = compiled_and_eager(6, launched)
    forward, backward = ["route_down", "rank_up"], ["rank_down", "top_k_route_backward"]
    assert launched == [*forward, *backward, "layer_gradients"]
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
def test_grouped_layer_compiles_as_one_graph_and_equals_eager(launched):
    """N/k = 8: under torch.compile too only the chosen experts are computed, in the layer's one custom op
    (mope::routed_grouped_layer) with the eager Function's launches, output and every gradient (the gate
    weights' at the chosen experts only)."""
    compiled, eager = compiled_and_eager(16, launched)
    forward, backward = ["top_k_route", "place_pairs", "grouped_pairs"], ["grouped_down", "top_k_route_backward"]
    assert launched == [*forward, *backward, "grouped_gradients"]
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
@pytest.mark.parametrize("num_experts", [6, 16], ids=["every-expert", "grouped"])
@pytest.mark.parametrize("output", [True, False], ids=["and-output", "losses-only"])
def test_the_compiled_layer_ops_pass_the_losses_gradients_through_logits_and_weights(num_experts, output):
    """A loss reading the logits and the gate weights, besides the output or alone: compiled (one op) and eager
    gradients agree for the input, the router and both factors."""
    from mope.kernels.layer import routed_layer

    g = torch.Generator().manual_seed(3)
    x, router, base = (
        torch.randn(*shape, generator=g).to(DEVICE) for shape in ((2, 7, 16), (num_experts, 16), (2, 7, 12))
    )
    lora_a, lora_b = (torch.randn(num_experts, 4, d, generator=g).to(DEVICE) for d in (16, 12))
    coefs = torch.randn(2, num_experts, generator=g).to(DEVICE)
    params = [t.requires_grad_() for t in (x, router, lora_a, lora_b)]

    def loss(x, router, lora_a, lora_b):
        out, logits, weights, *_ = routed_layer(x, router, lora_a, lora_b, base, 2, 1.0, True, 0.5)
        losses = (logits * coefs[0]).sum() + (weights * coefs[1]).square().sum()
        return losses + out.sum() if output else losses  # alone: the output gets no gradient

    torch._dynamo.reset()
    grads = functools.partial(torch.autograd.grad, inputs=params, materialize_grads=True)  # unused: zeros
    compiled = grads(torch.compile(loss, backend=COMPILER, fullgraph=True)(*params))
    eager = grads(loss(*params))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
@pytest.mark.parametrize("num_experts", [8, 16], ids=["every-expert", "grouped"])
def test_training_steps_with_the_router_losses_sums_leave_nothing_alive(num_experts):
    """Eager training steps of a tiny Llama with the default router losses, which the router's launch sums
    (mope.losses.LossSums, an output of each layer's Function): after the steps no layer's Function context and
    no LossSums may stay alive. The contexts once kept their LossSums, and with them the stats they return,
    whose grad_fn is the context: in a model's step Python's collector did not free that cycle, and each step
    leaked its layers' contexts (about 200 KB a step of the tiny Llama's heap)."""
    import gc

    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=num_experts, top_k=2, r=4,
        init_weights=False, dispatch="triton",
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config).to(DEVICE).train()

    def alive() -> int:
        gc.collect()
        return sum(type(o).__name__ in ("LossSums", "RoutedLayerBackward") for o in gc.get_objects())

    for _ in range(3):
        model(**{k: v.to(DEVICE) for k, v in make_batch("llama", pad=2).items()}).loss.backward()
    assert alive() == 0


@pytest.mark.parametrize("num_experts", [8, 16], ids=["every-expert", "grouped"])
@pytest.mark.parametrize("path", ["fused", "router-and-experts", "decode"])
@battery
def test_every_forward_launch_is_on_the_inputs_gpu(monkeypatch, num_experts, path):
    """Triton launches on the current CUDA device, not on its tensors': with a model split over GPUs
    (device_map="auto") each kernel entry makes its input's device current first (mope.kernels.grid.on_inputs_device).
    Here a stand-in says every input is on "GPU 7": each forward launch must run inside ``torch.cuda.device(7)``."""
    import mope.kernels.grid as grid

    kernel_type = type(mope.kernels.lora.rank_down)  # InterpretedFunction, or JITFunction on CUDA
    entered, launches = [], []

    class Current:  # torch.cuda.device's stand-in: records which device is current
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.pop()

    real_run = kernel_type.run

    def run(self, *args, **kwargs):
        launches.append(entered[-1] if entered else None)
        return real_run(self, *args, **kwargs)

    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=num_experts, top_k=2, r=4,
        init_weights=False, dispatch="triton", lora_dropout=0.1 if path == "router-and-experts" else 0.0,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in make_batch("llama", batch=1 if path == "decode" else 2).items()}
    monkeypatch.setattr(grid, "several_gpus", lambda: True)
    monkeypatch.setattr(grid, "launch_device", lambda device: 7)
    monkeypatch.setattr(torch.cuda, "device", Current)
    monkeypatch.setattr(kernel_type, "run", run)
    with torch.set_grad_enabled(path != "decode"):
        model.train(path != "decode")(**batch)  # the backward needs no guard: autograd makes the device current
    assert launches and set(launches) == {7}, launches


@battery
def test_llama_training_step_compiles_as_one_graph():
    """The whole step's forward (routing, kernels, aux losses) in one Dynamo graph; loss and gradients as eager.

    (Dynamo only, backend='eager': the ops' shapes and gradients are the layer test's; tracing the
    whole model through aot_eager costs seconds more under the interpreter.)
    """
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], num_experts=4, r=2, init_weights=False,
        dispatch="triton",
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config).to(DEVICE).train()
    batch = {k: v.to(DEVICE) for k, v in make_batch("llama", batch=2, seq=8, pad=3).items()}

    def step(batch):
        return model(**batch).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager" if DEVICE.type == "cpu" else COMPILER, fullgraph=True)
    got_loss, got = loss_and_grads(compiled, model, batch)
    want_loss, want = loss_and_grads(step, model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def make_router(router: str = "top_k", n: int = 6, k: int = 2, d: int = 16, **options):
    config = mope.MoPEConfig(num_experts=n, top_k=k, r=4, router=router, task_type="SEQ_CLS", **options)
    torch.manual_seed(0)
    gate = ROUTERS[router](d, n, k, config).to(DEVICE)
    with torch.no_grad():  # a router scale that makes the choice non-trivial
        gate.weight.normal_(0, 1.0)
    return gate


def routing_and_grads(gate, x: torch.Tensor, mask: torch.Tensor | None, dispatch: str):
    """The Routing's fields, the losses' values, and the gradients of x and the router weight of a loss using all."""
    gate.dispatch = dispatch
    routing = gate(x, RoutingInputs(token_mask=mask))
    upstream = torch.randn(routing.weights.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    losses = [load_balancing_loss(routing, mask), router_z_loss(routing, mask)]
    total = (routing.weights * upstream).sum() + sum(losses) + routing.probs.square().sum()
    fields = {f: getattr(routing, f) for f in ("weights", "logits", "probs", "load", "chosen", "dropped")}
    return fields, losses, torch.autograd.grad(total, [x, gate.weight])


def uses_router_kernel(routing) -> bool:
    """Whether the routing's logits come from the kernel's autograd node (through the views of their token shape)."""
    node = routing.logits.grad_fn
    while node is not None and type(node).__name__.startswith(("View", "Unsafe")):
        node = node.next_functions[0][0]
    return node is not None and "RouteTopK" in type(node).__name__


@battery
@pytest.mark.parametrize(
    "router, options, token_dims, train",
    [
        ("top_k", {}, (4, 9), True),
        ("top_k", {}, (37,), False),  # more tokens than one program's rows; eval
        ("top_k", {"router_temperature": 0.7, "num_experts": 20, "top_k": 3}, (4, 9), True),  # N > 16
        ("top_k", {"top_k_order": "softmax_then_topk_unnormalised"}, (4, 9), True),
        ("top_k", {"capacity_factor": 0.5}, (4, 9), True),  # drops, padding excluded from the competition
        ("switch", {}, (4, 9), True),  # unnormalised top-1, capacity 1.25
        ("top_k", {"top_k": 1}, (4, 9), True),  # renormalised top-1: weight 1, gradient only from the losses
    ],
    ids=["top2", "eval-37-tokens", "temperature-N20-top3", "unnormalised", "capacity", "switch", "top1"],
)
def test_router_kernel_equals_the_torch_router(router, options, token_dims, train):
    """Weights, chosen, logits, probs, load, dropped, the load-balancing and z losses under a padding mask,
    and the gradients of the router's input and weight."""
    options = dict(options)
    n, k = options.pop("num_experts", 6), options.pop("top_k", 2)
    gate = make_router(router, n, k, **options).train(train)
    x = torch.randn(*token_dims, 16, device=DEVICE, requires_grad=True)
    mask = torch.ones(token_dims, device=DEVICE)
    mask.view(-1)[-5:] = 0  # padding
    got_fields, got_losses, got_grads = routing_and_grads(gate, x, mask, "triton")
    want_fields, want_losses, want_grads = routing_and_grads(gate, x, mask, "masked")
    gate.dispatch = "triton"
    assert uses_router_kernel(gate(x, RoutingInputs(token_mask=mask)))
    if options.get("capacity_factor") or router == "switch":
        assert want_fields["dropped"].any()  # capacity really drops something
    for name, want in want_fields.items():
        got = got_fields[name]
        if want is None or want.dtype in (torch.bool, torch.long):
            assert got is None if want is None else torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    for got, want in zip([*got_losses, *got_grads], [*want_losses, *want_grads], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
@pytest.mark.parametrize("reads", ["weights", "logits"])
def test_router_kernel_gradients_when_only_the_weights_or_only_the_logits_are_read(reads):
    """Aux losses off (nothing reads the logits), or only the losses read the router: autograd gives the kernel
    no gradient for the other output, which counts as zero (the kernel is told, nothing is filled)."""
    gate = make_router("top_k", 6, 2).train()
    x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
    grads = {}
    for dispatch in ("masked", "triton"):
        gate.dispatch = dispatch
        out = getattr(gate(x, RoutingInputs()), reads)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        with ZeroFills() as fills:
            grads[dispatch] = torch.autograd.grad((out * upstream).sum(), [x, gate.weight])
        if dispatch == "triton":
            assert fills.ops == []
    for got, want in zip(grads["triton"], grads["masked"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class ZeroFills(TorchDispatchMode):
    """Records the aten ops that fill a tensor with zeros (or a constant) while active."""

    FILLS = frozenset({"zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.FILLS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def step_launches(layer: MoPELayer, launched: list[str]) -> tuple[list[str], list[str], list[str]]:
    """A triton layer's training step on 36 tokens: the kernels launched forward, those backward, and the ops that
    filled a tensor with zeros on the way."""
    mope.set_dispatch(layer.train(), "triton")
    x = torch.randn(4, 9, 16, device=DEVICE, requires_grad=True)
    with ZeroFills() as fills:
        out = layer(x)
        forward = list(launched)
        out.square().sum().backward()
    return forward, launched[len(forward) :], fills.ops


@battery
@pytest.mark.parametrize("num_experts", [6, 20], ids=["one-expert-tile", "two-expert-tiles"])
def test_a_routed_layer_training_step_launches_two_kernels_forward_two_or_three_backward_and_fills_nothing(
    num_experts, launched
):
    """The kernel count the GPU step's launch overhead follows: router and A in one, then B, forward; the backward
    in two where one tile holds every expert's ranks (N r <= 64: the gate's and the scores' gradients in one
    launch), else three (the scores' gradient apart); then the input's gradient from experts and router and
    every weight's gradient in one; no torch add."""
    forward, backward, fills = step_launches(mope_layer("top_k", num_experts=num_experts, top_k=3), launched)
    assert forward == ["route_down", "rank_up"]
    scores = ["down_scores"] if num_experts == 6 else ["rank_down", "top_k_route_backward"]
    assert backward == [*scores, "layer_gradients"]
    assert fills == []


@battery
def test_a_grouped_layer_training_step_launches_three_kernels_each_way_and_fills_nothing(launched):
    """Only the chosen experts (N/k = 8). Forward: the router (which counts each block's pairs per expert), the
    sort's placing, then every pair's row (A, B and the base output) in one launch. Backward: the experts' gate
    gradient per pair, the scores' gradient, then the input's gradient per pair (with the router's d W) and every
    weight gradient in one launch. No tensor of zeros is filled on the way."""
    forward, backward, fills = step_launches(mope_layer("top_k", num_experts=16), launched)
    assert forward == ["top_k_route", "place_pairs", "grouped_pairs"]
    assert backward == ["grouped_down", "top_k_route_backward", "grouped_gradients"]
    assert fills == []


@battery
def test_a_grouped_layer_with_many_experts_sorts_with_its_own_counts_and_equals_masked(launched):
    """N = 256 at top-2: a block of the router's pairs by every expert is more than a sort program holds, so the
    sort counts the pairs in its own launch, as the unfused kernels do; output and gradients equal masked's."""
    forward = triton_equals_masked(mope_layer("top_k", num_experts=256).train(), launched)
    assert forward == ["top_k_route", "count_pairs", "place_pairs", "grouped_pairs"]


def triton_equals_masked(layer: MoPELayer, launched: list[str]) -> list[str]:
    """The layer's output and every gradient (the input's and its trained parameters') of ``out.square().sum()``
    with ``dispatch='triton'`` equal masked's (to 1e-5); returns the kernels the triton forward launched."""
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    results, forward = {}, []
    for dispatch in ("triton", "masked"):
        mope.set_dispatch(layer, dispatch)
        launched.clear()
        out = layer(x)
        forward = forward or list(launched)
        results[dispatch] = [out, *torch.autograd.grad(out.square().sum(), params)]
    for got, want in zip(results["triton"], results["masked"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return forward


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    """The names of the Triton kernels launched while the test runs, in order."""
    from mope.kernels import router as router_kernels

    launches = []
    kernel_type = type(router_kernels.top_k_route)
    original = kernel_type.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        with _disable_current_modes():  # the interpreter's own tensor work is not the step's
            return original(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", run)
    return launches


@battery
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize(
    "options",
    [{}, {"router_temperature": 0.7, "num_experts": 20, "top_k": 3}, {"top_k_order": "softmax_then_topk_unnormalised"}],
    ids=["top_k", "temperature-n20-top3", "unnormalised"],
)
def test_decoding_a_few_tokens_is_one_kernel_and_equals_masked(tokens, options, launched):
    """No gradient, at most 16 tokens: the router and the chosen experts in one launch. Widths of 150 in and 300
    out: three steps over the input, two programs of columns per token, the second one part-filled."""
    layer = mope_layer("top_k", widths=(150, 300), **options).eval()
    x = torch.randn(tokens, 150, device=DEVICE)
    with torch.no_grad():
        mope.set_dispatch(layer, "masked")
        want = layer(x)
        mope.set_dispatch(layer, "triton")
        got = layer(x)
    assert launched == ["routed_decode_kernel"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@battery
def test_decoding_on_a_bf16_base_adds_the_fp32_experts_into_its_bf16_output(launched):
    """A bf16 base layer: the experts see its input cast to fp32 once, the sum is rounded to bf16 once."""
    layer = mope_layer("top_k", widths=(150, 300)).eval()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(2, 3, 150, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        mope.set_dispatch(layer, "masked")
        want = layer(x)
        exact_layer = copy.deepcopy(layer).double()  # the experts' delta in float64, on the bf16 base's output
        delta = exact_layer(x.double()) - exact_layer.base_layer(x.double())
        exact = layer.base_layer(x).double() + delta
        mope.set_dispatch(layer, "triton")
        got = layer(x)
    assert launched == ["routed_decode_kernel"] and got.dtype == want.dtype == torch.bfloat16
    error, masked_error = reference_error(got, want, exact)  # the interpreter's bf16 stores truncate: up to 2x
    assert error < 3 * masked_error, (error, masked_error)


@battery
@pytest.mark.parametrize("case", ["17-tokens", "gradient", "training"])
def test_decoding_takes_the_training_path_where_tokens_gradients_or_losses_ask_for_it(case, launched):
    """More than 16 tokens, a gradient wanted, or a layer in training whose routing the losses record."""
    layer = mope_layer("top_k").train(case == "training")
    mope.set_dispatch(layer, "triton")
    x = torch.randn(17 if case == "17-tokens" else 4, 16, device=DEVICE)
    with torch.set_grad_enabled(case == "gradient"):
        if case == "training":
            layer.routing_context = RoutingContext()
        layer(x)
    assert launched == ["route_down", "rank_up"]


@battery
def test_greedy_generation_with_the_kv_cache_equals_masked():
    """A tiny Llama decodes token by token through the one kernel: the tokens masked picks, and its scores."""
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", num_experts=8, top_k=2, r=4, init_weights=False
    )
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config).to(DEVICE).eval()
    prompt = torch.randint(0, 100, (2, 5), device=DEVICE)
    results = {}
    for name in ("masked", "triton"):
        mope.set_dispatch(model, name)
        results[name] = model.generate(
            input_ids=prompt, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=0,
        )  # fmt: skip
    assert torch.equal(results["triton"].sequences, results["masked"].sequences)
    for got, want in zip(results["triton"].scores, results["masked"].scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@battery
def test_router_kernel_keeps_exactly_k_of_tied_experts_the_lowest_first():
    """Experts 1, 2 and 4 score alike: exactly k are kept, with the weights torch gives (torch's own pick
    among the tied is its implementation's; the kernel's is the lowest index)."""
    gate = make_router("top_k", n=6, k=2)
    with torch.no_grad():
        gate.weight[2] = gate.weight[4] = gate.weight[1]
    x = torch.randn(11, 16, device=DEVICE)
    x = (x * torch.sign(x @ gate.weight[1].detach())[:, None]).requires_grad_()  # the tied experts lead mostly
    got, _, _ = routing_and_grads(gate, x, None, "triton")
    want, _, _ = routing_and_grads(gate, x, None, "masked")
    assert ((got["weights"] != 0).sum(-1) == 2).all()
    torch.testing.assert_close(got["weights"].sort(-1).values, want["weights"].sort(-1).values, rtol=1e-6, atol=1e-7)
    group = [1, 2, 4]
    torch_differs = 0
    for got_picks, want_picks in zip(got["chosen"].tolist(), want["chosen"].tolist(), strict=True):
        tied = [e for e in want_picks if e in group]
        torch_differs += sorted(tied) != group[: len(tied)]
        assert sorted(e for e in got_picks if e not in group) == sorted(e for e in want_picks if e not in group)
        assert [e for e in got_picks if e in group] == group[: len(tied)], (got_picks, want_picks)
    assert torch_differs  # the case happens: torch keeps tied experts other than the lowest


@battery
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy's, under the interpreter
def test_router_kernel_ranks_nan_above_inf_as_torch_topk():
    """Expert 4 scores NaN for every token, expert 1 +inf or -inf by the sign of the token's first feature: the
    kernel picks NaN first (before +inf at a lower index), then +inf, then the largest finite, as ``torch.topk``
    does, and -inf last."""
    from mope.kernels.router import route_top_k

    x = torch.randn(12, 16, device=DEVICE)
    weight = torch.randn(6, 16, device=DEVICE)
    weight[1] = 0
    weight[1, 0], weight[4, 0] = float("inf"), float("nan")
    logits, _, chosen = route_top_k(x, weight, 3, 1.0, True)
    assert logits[:, 4].isnan().all() and logits[:, 1].isinf().all() and (logits[:, 1] < 0).any()
    assert torch.equal(chosen, torch.topk(logits, 3).indices)


@battery
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # NumPy's, under the interpreter
@pytest.mark.parametrize("num_experts", [6, 16], ids=["every-expert", "grouped"])
def test_a_token_with_nan_logits_takes_k_real_experts_and_its_row_is_nan_as_masked(num_experts):
    """A NaN in one token's hidden state (an fp16 overflow upstream) makes all its logits NaN. The router kernel
    ranks NaN above +inf, as ``torch.topk`` does, so the token takes k distinct real experts (it took index N:
    the losses' load indexed past the experts, the grouped sort wrote past its buffers and the row was garbage)
    and its output row is NaN, as masked's; every other token's output and routing are masked's."""
    layer = mope_layer("top_k", num_experts=num_experts, importance_loss_coef=0.1).train()
    x = torch.randn(40, 16, device=DEVICE)
    x[2, 5] = float("nan")
    results = {}
    for dispatch in ("masked", "triton"):
        mope.set_dispatch(layer, dispatch)
        layer.routing_context = context = RoutingContext()
        context.begin({}, collecting=True)
        out = layer(x)
        routing = context.finish()[0].routing  # what the losses read
        results[dispatch] = [out, routing.chosen, routing.load]
    assert kernel_node(out) == "RoutedLayerBackward"
    chosen = results["triton"][1]
    assert ((chosen >= 0) & (chosen < num_experts)).all() and chosen[2, 0] != chosen[2, 1]
    others = torch.arange(40, device=DEVICE) != 2
    for got, want in zip(results["triton"], results["masked"], strict=True):
        torch.testing.assert_close(got[others], want[others], rtol=1e-5, atol=1e-5)
    assert results["triton"][0][2].isnan().all() and results["masked"][0][2].isnan().all()
    assert results["triton"][2][2].sum() == 1  # its load: the k real experts'


@battery
def test_the_sort_drops_a_pair_whose_expert_is_out_of_range_writing_nothing_past_its_outputs():
    """A pair whose expert lies outside ``[0, N)`` (never the router kernel's) is dropped: it was placed at an
    out-of-bounds position (one element before the sorted pairs, which corrupted the heap). The real pairs sort as
    torch's stable sort does, the offsets count them, and nothing else of the outputs, or around them, is written."""
    from mope.kernels.grouped import count_pairs, place_pairs

    n, k, tokens = 6, 2, 50
    chosen = torch.randint(0, n, (tokens, k), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    chosen[3, 0], chosen[7, 1], chosen[9, 0] = n, -1, 8  # 6 and 7: the expert tile's padding; 8: past it
    weights = torch.rand(tokens, n, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pairs, tile = chosen.numel(), 128  # one block of the sort
    counts = torch.empty(1, n, dtype=torch.int32, device=DEVICE)
    offsets = torch.empty(n + 1, dtype=torch.long, device=DEVICE)
    count_pairs[(1,)](chosen, counts, pairs, n, BP=tile, NP=8)
    dest, gate = torch.full((pairs + 2,), -7, device=DEVICE), torch.full((pairs + 2,), -7.0, device=DEVICE)
    place_pairs[(1,)](
        chosen, counts, counts, weights, offsets, dest[1:-1], gate[1:-1], pairs, pairs, 1, n, k,
        RUNNING=False, BP=tile, NP=8, BB=1,
    )  # fmt: skip
    flat = chosen.reshape(-1)
    real = ((flat >= 0) & (flat < n)).nonzero().squeeze(1)
    order, placed = real[flat[real].sort(stable=True).indices], real.numel()
    assert offsets[-1] == counts.sum() == placed == pairs - 3
    assert torch.equal(dest[1 : 1 + placed], order) and dest[0] == gate[0] == -7
    assert (dest[1 + placed :] == -7).all() and (gate[1 + placed :] == -7).all()  # the dropped pairs' places
    torch.testing.assert_close(gate[1 : 1 + placed], weights.reshape(-1)[(order // k) * n + flat[order]])


@battery
@pytest.mark.parametrize(
    "router, options",
    [("top_k", {"router_noise": True}), ("top_k", {"router_jitter": 0.1}), ("cosine", {}), ("top_p", {})],
    ids=["noise", "jitter", "cosine-own-score", "top_p"],
)
def test_router_kernel_is_not_used_where_it_does_not_apply(router, options):
    """Noise and jitter of training are drawn in torch; gates that score or gate otherwise keep their torch path."""
    gate = make_router(router, **options).train()
    gate.dispatch = "triton"
    assert not uses_router_kernel(gate(torch.randn(5, 16, device=DEVICE, requires_grad=True)))
    if options:  # in eval there is no noise: the kernel routes
        assert uses_router_kernel(gate.eval()(torch.randn(5, 16, device=DEVICE, requires_grad=True)))


@battery
def test_past_the_router_kernels_experts_the_router_scores_in_torch_and_the_experts_kernels_equal_masked(launched):
    """Past ``ROUTER_KERNEL_MAX_EXPERTS`` (a token's logits in one tile would outgrow a GPU block's shared memory)
    the router scores in torch, up to it in the kernel; past it a layer's experts still run the grouped kernels,
    and its output and every gradient equal masked's."""
    from mope.kernels import ROUTER_KERNEL_MAX_EXPERTS

    x = torch.randn(5, 16, device=DEVICE)
    for n in (ROUTER_KERNEL_MAX_EXPERTS, ROUTER_KERNEL_MAX_EXPERTS + 1):
        gate = make_router(n=n).train()
        gate.dispatch = "triton"
        assert uses_router_kernel(gate(x)) == (n == ROUTER_KERNEL_MAX_EXPERTS)
    forward = triton_equals_masked(mope_layer("top_k", num_experts=ROUTER_KERNEL_MAX_EXPERTS + 1).train(), launched)
    assert "grouped_pairs" in forward and "top_k_route" not in forward, forward


@battery
def test_no_tokens_give_the_base_output_and_zero_gradients():
    x, lora_a, lora_b, weights, base = flat_inputs(torch.float32, torch.float32)
    out = resolve_dispatch("triton", x, lora_a, 3).apply(x[:0], lora_a, lora_b, weights[:0], 2.0, base[:0])
    assert out.shape == (0, 40)
    grads = torch.autograd.grad(out.sum(), [lora_a, lora_b], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@battery
def test_float64_is_refused_naming_the_dtype():
    x, lora_a = torch.zeros(4, 8, dtype=torch.float64, device=DEVICE), torch.zeros(2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dispatch='triton' cannot run.*float32, bfloat16 or float16.*float64"):
        resolve_dispatch("triton", x, lora_a.to(DEVICE), 2)


def router_kernel_step(dtype: torch.dtype) -> list[torch.Tensor]:
    gate = make_router("top_k")
    gate.dispatch = "triton"
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    routing = gate(x)
    return torch.autograd.grad((routing.weights * routing.logits).sum(), [x, gate.weight])


def grouped_step(dtype: torch.dtype) -> list[torch.Tensor]:
    inputs = flat_inputs(dtype, dtype, (24,), 17, 4)
    return with_chosen(grouped_lora, inputs, chosen_of(inputs[3]))


def fused_layer_step(dtype: torch.dtype) -> list[torch.Tensor]:
    """A layer's router and experts in one Function (its base layer in ``dtype``, the experts in fp32)."""
    layer = mope_layer("top_k").train()
    layer.base_layer.to(dtype)
    mope.set_dispatch(layer, "triton")
    x = torch.randn(4, 9, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert kernel_node(out) == "RoutedLayerBackward"
    params = [layer.mope_experts["default"].lora_A, layer.mope_router["default"].weight]
    return torch.autograd.grad(out.float().square().sum(), [x, *params])


def masked_kernels_step(dtype: torch.dtype) -> list[torch.Tensor]:
    inputs = flat_inputs(dtype, dtype)
    return outputs_and_grads(resolve_dispatch("triton", inputs[0], inputs[1], 3).apply, inputs)


@battery
@pytest.mark.skipif(DEVICE.type != "cuda", reason="host syncs are detectable on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", [masked_kernels_step, grouped_step, router_kernel_step, fused_layer_step])
def test_kernels_forward_and_backward_make_no_host_sync(step, dtype):
    """The kernels alone (the routing's syncs are test_dispatch's): any sync raises."""
    step(dtype)  # warm-up: compiling the kernels may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(KERNELS_RUN or kernels_interpreted(), reason="the battery runs (or would) in this process")
def test_battery_under_the_interpreter_and_its_kernels_compile_for_an_h100(tmp_path):
    """The battery above, in one fresh process with TRITON_INTERPRET=1 and CUDA hidden (a few seconds of kernels).

    The interpreter checks neither what ``tl.dot`` takes on a GPU nor what Triton can lower, so every kernel
    and constexpr set the battery launched (and bf16 ``tl.dot`` operands, which only a GPU picks) is then
    compiled here to a cubin for an H100 (sm_90) by Triton's compiler, no GPU needed; every kernel that is not
    a device function must have been launched. Each block's shared memory must fit the GPU's (a launch that needs
    more is refused): every launch on an H100; each kernel's largest on an A100 (sm_80) and on the GPUs with 99 KB
    a block (sm_89: L4, RTX 40 series; sm_120: RTX 50 series, whose Blackwell compiler differs), with the options
    :func:`mope.kernels.grid.options_for` gives them.
    """
    from kernel_specs import SHARED_MEMORY, compile_set, compile_spec, largest, launched_kernels

    from mope.kernels.grid import options_for

    launches = tmp_path / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", LAUNCHES_FILE: str(launches)}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-x", __file__]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "passed" in summary and "failed" not in summary, summary
    assert launches.exists(), f"the battery launched no kernel:\n{done.stdout[-3000:]}"
    specs = json.loads(launches.read_text())
    assert {spec["kernel"] for spec in specs} == launched_kernels(KERNEL_MODULES)
    compiled = compile_set(specs)
    needs = []
    for spec in compiled:
        cubin, shared = compile_spec(spec, 90, options_for(SHARED_MEMORY[90]))
        assert cubin > 0 and shared <= SHARED_MEMORY[90], (spec, shared)
        needs.append(shared)
    for arch in (80, 89, 120):
        for spec in largest(compiled, needs):
            _, shared = compile_spec(spec, arch, options_for(SHARED_MEMORY[arch]))
            assert shared <= SHARED_MEMORY[arch], (arch, spec, shared)


# refused where the kernels cannot run ------------------------------------------------------------


@refusal
def test_cpu_without_the_interpreter_is_refused_naming_why_and_the_model_is_unchanged():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, r=2, dispatch="triton")
    model = get_peft_model(make_model("llama"), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch("llama")
    if not HAS_TRITON:
        reason = "Triton is not installed"
    elif kernels_interpreted():  # an interpreter that cannot run them (interpreter_fault)
        reason = r"Triton \S+'s interpreter .*numpy<2\.4"
    else:
        reason = r"Triton kernels run on CUDA.*TRITON_INTERPRET=1"
    with pytest.raises(
        ValueError, match=rf"dispatch='triton' cannot run on these cpu tensors: {reason}.*dispatch='auto'"
    ):
        model(**batch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    mope.set_dispatch(model, "auto")
    model(**batch)  # the fix the message names works


def test_an_interpreter_that_fails_with_this_numpy_is_named_with_both_versions_and_the_fix():
    # Triton 3.6's interpreter (torch 2.11's pin) with NumPy 2.4.6 failed every kernel with a loop, as
    # "InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python scalars')"
    reason = interpreter_fault("3.6.0", "2.4.6")
    assert "Triton 3.6.0" in reason and "NumPy 2.4.6" in reason and "triton>=3.7 or numpy<2.4" in reason
    assert interpreter_fault("3.5.1", "2.4.0") is not None
    assert interpreter_fault("3.6.0", "2.3.5") is None  # ran the battery
    assert interpreter_fault("3.7.0", "2.4.6") is None and interpreter_fault("3.9.0", "2.5.2") is None


@battery
def test_an_interpreter_that_fails_with_this_numpy_is_refused_before_any_kernel_and_the_model_is_unchanged(
    monkeypatch,
):
    if DEVICE.type != "cpu":
        pytest.skip("the interpreter runs on CPU only")
    monkeypatch.setattr(mope.kernels.lora, "INTERPRETER_FAULT", interpreter_fault("3.6.0", "2.4.6"))
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, r=2, dispatch="triton")
    model = get_peft_model(make_model("llama"), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"cannot run on these cpu tensors: Triton 3\.6\.0's interpreter.*numpy<2\.4"):
        model(**make_batch("llama"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@refusal
def test_auto_never_picks_triton_off_cuda():
    x, lora_a = torch.zeros(4096, 64), torch.zeros(64, 8, 64)
    for active in (1, 2, 64):
        assert resolve_dispatch("auto", x, lora_a, active).name in ("masked", "sparse", "sorted")
    for device in ("cpu", "cuda", "mps"):  # until measured on a GPU, auto keeps its torch picks everywhere
        assert auto_dispatch(4096, 64, 2, device) != "triton"


def test_without_triton_set_dispatch_is_refused_with_the_install_line(monkeypatch):
    model = get_peft_model(make_model("llama"), mope.MoPEConfig(target_modules=["q_proj"], num_experts=4, r=2))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"dispatch='triton': Triton is not installed: pip install 'mope\[triton\]'"):
        mope.set_dispatch(model, "triton")
    assert {b.dispatch for b in model.modules() if hasattr(b, "active_experts")} == {"auto"}
    assert triton_unavailable(torch.device("cuda")).startswith("Triton is not installed")


def test_a_triton_that_does_not_import_is_refused_as_a_missing_one(monkeypatch):
    # find_spec found it, so set_dispatch accepted it and the forward raised the bare ImportError
    import importlib.abc
    import importlib.machinery
    import sys

    from mope import kernels

    class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] == "triton" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError("libtriton.so: undefined symbol")

    for name in [n for n in sys.modules if n.split(".")[0] == "triton" or n.startswith("mope.kernels.")]:
        monkeypatch.delitem(sys.modules, name)
        if name.startswith("mope.kernels."):  # `from . import lora` takes the package's attribute first
            monkeypatch.delattr(kernels, name.rsplit(".", 1)[1], raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    kernels.triton_broken.cache_clear()
    try:
        model = get_peft_model(make_model("llama"), mope.MoPEConfig(target_modules=["q_proj"], num_experts=4, r=2))
        with pytest.raises(ValueError, match=r"dispatch='triton': Triton is installed but does not import \(libtriton"):
            mope.set_dispatch(model, "triton")
        assert "does not import" in triton_unavailable(torch.device("cuda"))
    finally:
        kernels.triton_broken.cache_clear()


def test_kernels_launch_on_the_inputs_gpu_only_where_several_are_and_another_is_current(monkeypatch):
    from mope.kernels import grid

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for count, want in ((2, {"cuda:1": 1, "cuda:0": None}), (1, {"cuda:1": None, "cuda:0": None})):
        monkeypatch.setattr(grid, "gpu_count", [])
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert {name: grid.launch_device(torch.device(name)) for name in want} == want, count
        assert grid.launch_device(torch.device("cpu")) is None
        assert grid.gpu_count == [count]  # read once


@pytest.mark.skipif(not HAS_TRITON or kernels_interpreted(), reason="needs Triton, compiling for a GPU")
def test_nvidia_gpus_older_than_ampere_are_refused_naming_the_gpu_and_its_capability(monkeypatch):
    from mope.kernels import gpu_too_old

    capabilities = {0: (7, 5), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: ["Tesla T4", "A100", "H100"][index])
    gpu_too_old.cache_clear()
    try:
        reason = triton_unavailable(torch.device("cuda", 0))
        assert "compute capability 8.0 or newer" in reason and "cuda:0 (Tesla T4) has 7.5" in reason
        assert (
            triton_unavailable(torch.device("cuda", 1)) is None and triton_unavailable(torch.device("cuda", 2)) is None
        )
        gpu_too_old.cache_clear()
        monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports its own architectures: not refused here
        assert triton_unavailable(torch.device("cuda", 0)) is None
    finally:
        gpu_too_old.cache_clear()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_set_dispatch_and_the_config_reach_the_top_k_routers_and_the_count_is_the_banks():
    config = mope.MoPEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, r=2, dispatch="triton")
    model = get_peft_model(make_model("llama"), config)
    routers = [m for m in model.modules() if isinstance(m, mope.routing.TopKRouter)]
    banks = [m for m in model.modules() if hasattr(m, "active_experts")]
    assert len(routers) == len(banks) == 4 and {r.dispatch for r in routers} == {"triton"}
    assert mope.set_dispatch(model, "masked") == len(banks)
    assert {r.dispatch for r in routers} == {b.dispatch for b in banks} == {"masked"}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_host_grid_arithmetic_equals_tritons():
    import triton

    from mope.kernels.grid import cdiv, next_power_of_2

    for n in range(1, 600):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (1, 16, 32, 64):
            assert cdiv(n, block) == triton.cdiv(n, block)
    assert cdiv(0, 64) == triton.cdiv(0, 64) == 0


@pytest.mark.parametrize(
    "shared, stages, options",
    [
        ((232448,), 3, {}),  # H100
        ((166912, 232448), 3, {}),  # A100 with an H100: the smaller decides
        ((101376,), 2, {"num_stages": 2}),  # L4, RTX 40 series (sm_89), sm_86, sm_120
        ((232448, 101376), 2, {"num_stages": 2}),
        ((65536,), 1, {"num_stages": 1}),  # T4
    ],
)  # fmt: skip
def test_launches_take_fewer_pipelining_stages_only_on_gpus_whose_blocks_hold_less_shared_memory(
    shared, stages, options, monkeypatch
):  # fmt: skip
    """Triton's default 3 stages where a block may hold 164 KB or more (none passed), else fewer, by the smallest
    visible GPU's; 8 warps and fp fusion on everywhere; nothing on a machine without CUDA."""
    from types import SimpleNamespace

    from mope.kernels.grid import launch_options, stages_for

    assert launch_options.__wrapped__() == ({} if not torch.cuda.is_available() else launch_options())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(shared))
    properties = [SimpleNamespace(shared_memory_per_block_optin=b, shared_memory_per_block=49152) for b in shared]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: properties[i])
    everywhere = {"num_warps": 8, "enable_fp_fusion": True}
    assert stages_for(min(shared)) == stages and launch_options.__wrapped__() == {**everywhere, **options}


@pytest.mark.skipif(not HAS_TRITON or kernels_interpreted(), reason="compiles with Triton's compiler")
def test_the_launch_options_say_fp_fusion_so_triton_neither_warns_nor_changes_it_by_version(monkeypatch):
    """Triton 3.9 warns at a compile that leaves fp fusion unset (its default turns off in 3.10); the kernels' launch
    options set it, as the compile checks measured them. Compiles one small kernel for an H100, no GPU needed."""
    import warnings

    from kernel_specs import SHARED_MEMORY, SMALL_SPEC, compile_kernel

    from mope.kernels.grid import options_for

    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    monkeypatch.delenv("TRITON_FORCE_DISABLE_FP_FUSION", raising=False)
    warn_once = getattr(importlib.import_module("triton._utils"), "warn_once", None)
    for options, warns in ((options_for(SHARED_MEMORY[90]), False), ({}, warn_once is not None)):
        if warn_once is not None:
            warn_once.cache_clear()  # once a process, else
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = compile_kernel(SMALL_SPEC, 90, options)
        assert compiled.metadata.enable_fp_fusion is True
        assert any("FP_FUSION" in str(w.message) for w in caught) == warns, [str(w.message) for w in caught]
