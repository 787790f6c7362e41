"""Sparse gates (top_k variants, switch, expert_choice, balanced) on tiny models, their options and guarantees.

Reference implementations for capacity dropping, switch and expert choice live in
``test_gates_capacity.py``; the balanced gate's guarantees in ``test_gates_balanced.py``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from conftest import assert_round_trip, make_batch, make_model
from peft import get_peft_model
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mope
from mope.routing import ROUTERS, NoncausalRoutingError, RoutingInputs
from mope.routing.base import Deferrable, Routing, stack_field

ROWS = {
    "top_k_topk_then_softmax": {"top_k_order": "topk_then_softmax"},
    "top_k_unnormalised": {"top_k_order": "softmax_then_topk_unnormalised"},
    "top_k_noisy": {"router_noise": True},
    "top_k_capacity_sequence": {"capacity_factor": 1.0},
    "top_k_capacity_bpr": {"capacity_factor": 1.0, "capacity_policy": "bpr"},
    "top_k_capacity_random_second": {"capacity_factor": 1.0, "capacity_policy": "random_second"},
    "switch": {"router": "switch", "capacity_factor": 0.75},
    "expert_choice": {"router": "expert_choice", "allow_noncausal_routing": True},
    "balanced": {"router": "balanced"},
}


def sparse_config(model: str, **kwargs) -> mope.MoPEConfig:
    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    base = {"target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4}
    return mope.MoPEConfig(task_type=task, **{**base, **kwargs})


def make_router(router: str = "top_k", n: int = 4, k: int = 2, in_features: int = 8, **kwargs):
    config = mope.MoPEConfig(num_experts=n, top_k=k, router=router, **kwargs)
    return ROUTERS[router](in_features, n, k, config)


@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("row", list(ROWS))
def test_gate_trains_and_round_trips(row, model_name, tmp_path):
    torch.manual_seed(0)
    batch = make_batch(model_name, pad=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = make_model(model_name)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = get_peft_model(base, sparse_config(model_name, **ROWS[row]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=0, atol=0)

    routers = [m for m in model.modules() if isinstance(m, mope.Router)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        out = model(**batch)
        out.loss.backward()
        assert all(r.weight.grad is not None and torch.isfinite(r.weight.grad).all() for r in routers)
        if ROWS[row].get("router_noise"):
            assert any(r.noise_weight.grad.abs().sum() > 0 for r in routers)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert min(losses[-3:]) < losses[0], losses

    assert_round_trip(model, model_name, tmp_path)


def test_topk_orders():
    logits = torch.randn(5, 7, 6)
    inputs = RoutingInputs()
    renorm = make_router(n=6, k=3).gate(logits, inputs)
    shazeer = make_router(n=6, k=3, top_k_order="topk_then_softmax").gate(logits, inputs)
    raw = make_router(n=6, k=3, top_k_order="softmax_then_topk_unnormalised").gate(logits, inputs)
    torch.testing.assert_close(shazeer.weights, renorm.weights)  # equal in value, as documented
    # GShard's formulation spelled out (softmax, top-k of the probabilities, divide by their sum):
    # the same weights and the same gradient as the softmax over the top logits that mope computes
    reference_logits = logits.clone().requires_grad_()
    probs = reference_logits.softmax(-1)
    values, index = probs.topk(3, dim=-1)
    reference = torch.zeros_like(probs).scatter(-1, index, values / values.sum(-1, keepdim=True))
    ours_logits = logits.clone().requires_grad_()
    ours = make_router(n=6, k=3).gate(ours_logits, inputs).weights
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(reference)
    torch.testing.assert_close(
        torch.autograd.grad(ours, ours_logits, upstream)[0],
        torch.autograd.grad(reference, reference_logits, upstream)[0],
    )
    chosen = renorm.weights > 0
    assert (chosen.sum(-1) == 3).all() and torch.equal(raw.weights > 0, chosen)
    torch.testing.assert_close(raw.weights, logits.softmax(-1) * chosen)
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(5, 7))
    # without autograd mope takes another formulation (fewer forward ops): the same weights
    torch.testing.assert_close(renorm.weights, ours.detach())


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_topk_keeps_exactly_k_experts_when_logits_tie(grad):
    """A zero-initialised router scores every expert 0: still exactly k chosen, each weighted 1/k."""
    logits = torch.zeros(4, 6, requires_grad=grad)
    weights = make_router(n=6, k=2).gate(logits, RoutingInputs()).weights
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    assert set(weights.unique().tolist()) == {0.0, 0.5}


def test_noisy_top_k_noise_is_softplus_scaled_and_training_only():
    torch.manual_seed(0)
    router = make_router(n=4, k=1, router_noise=True)
    with torch.no_grad():
        router.weight.normal_()
        router.noise_weight.normal_()
    x = torch.randn(8)
    clean = F.linear(x, router.weight)
    router.train()
    draws = torch.stack([router.score(x) for _ in range(4000)]) - clean
    torch.testing.assert_close(draws.std(0), F.softplus(F.linear(x, router.noise_weight)), rtol=0.06, atol=0)
    torch.testing.assert_close(draws.mean(0), torch.zeros(4), rtol=0, atol=0.1)
    router.eval()
    torch.testing.assert_close(router.score(x), clean, rtol=0, atol=0)


def test_noise_weight_is_saved(tmp_path):
    model = get_peft_model(make_model("llama"), sparse_config("llama", router_noise=True))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(key.endswith("mope_router.noise_weight") for key in keys)


def test_expert_choice_refuses_inference_in_causal_lm():
    batch = make_batch("llama")
    model = get_peft_model(make_model("llama"), sparse_config("llama", router="expert_choice"))
    model.train()
    model(**batch).loss.backward()  # training is allowed (the caveat is documented)
    model.eval()
    with pytest.raises(NoncausalRoutingError, match="allow_noncausal_routing"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(NoncausalRoutingError, match=r"MoPEConfig\.allow_noncausal_routing=True"), torch.no_grad():
        model(**batch)
    allowed = get_peft_model(
        make_model("llama"), sparse_config("llama", router="expert_choice", allow_noncausal_routing=True)
    )
    allowed.eval()
    out = allowed.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    assert out.shape == (2, 10)
    encoder = get_peft_model(make_model("bert"), sparse_config("bert", router="expert_choice"))
    encoder.eval()
    with torch.no_grad():
        encoder(**make_batch("bert"))  # an encoder is not causal: no refusal


def test_expert_choice_refuses_a_kv_cache_step_in_any_model():
    router = make_router("expert_choice")  # no task_type: not known to be causal
    router.train()
    logits = torch.randn(2, 1, 4)
    with pytest.raises(NoncausalRoutingError, match="allow_noncausal_routing"):
        router.gate(logits, RoutingInputs(cache_step=True))
    allowed = make_router("expert_choice", allow_noncausal_routing=True)
    assert allowed.gate(logits, RoutingInputs(cache_step=True)).weights.shape == (2, 1, 4)


SYNC_ROWS = [
    {"router": "top_k", "capacity_factor": 1.0, "capacity_policy": policy}
    for policy in ("sequence", "bpr", "random_second")
] + [
    {"router": "top_k", "router_noise": True},
    {"router": "switch"},
    {"router": "expert_choice"},
    {"router": "balanced", "k": 3},
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are detectable on CUDA only")
@pytest.mark.parametrize("kwargs", SYNC_ROWS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_gates_make_no_host_sync(kwargs):
    router = make_router(**kwargs, n=6).cuda()
    x = torch.randn(4, 32, 8, device="cuda")
    mask = torch.ones(4, 32, dtype=torch.long, device="cuda")
    mask[0, :5] = 0
    for training in (True, False):
        router.train(training)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            routing = router(x, RoutingInputs(token_mask=mask))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert routing.weights.shape == (4, 32, 6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"capacity_factor": float("inf")}, "capacity_factor"),
        ({"capacity_factor": "1"}, "capacity_factor"),
        ({"capacity_factor": 1.0, "router": "dense"}, "capacity_factor"),
        ({"capacity_policy": "fifo"}, "capacity_policy"),
        ({"top_k_order": "topk"}, "top_k_order"),
        ({"router_noise": 1}, "router_noise"),
        ({"allow_noncausal_routing": "yes"}, "allow_noncausal_routing"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
    ],
)
def test_invalid_sparse_gate_options(kwargs, field):
    with pytest.raises(ValueError, match=f"MoPEConfig.{field}"):
        mope.MoPEConfig(**kwargs)


def test_router_scores_in_fp32_under_cpu_autocast():
    """Under bf16 autocast the router still scores in fp32: the same logits as without autocast."""
    model = get_peft_model(make_model("llama"), mope.MoPEConfig(target_modules=["q_proj"], num_experts=4, r=2))
    router = next(m for m in model.modules() if isinstance(m, ROUTERS["top_k"]))
    x = torch.randn(2, 3, router.weight.shape[1])
    plain = router(x, RoutingInputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = router(x, RoutingInputs())
        assert torch.is_autocast_enabled("cpu")  # the router's own context did not leak out
    assert cast.logits.dtype == cast.weights.dtype == torch.float32
    torch.testing.assert_close(cast.logits, plain.logits)


class AtenCounter(TorchDispatchMode):
    """Counts the aten ops that run inside it, by name (e.g. 'softmax', 'scatter')."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__.lstrip("_")] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("router_name", ["top_k", "balanced"])
def test_probs_and_load_cost_nothing_until_read(router_name):
    """A top-k routing computes its full softmax and its load only when something reads them."""
    router = make_router(router_name, n=6, k=2).eval()
    logits = torch.randn(3, 5, 6)
    with AtenCounter() as ops:
        routing = router.gate(logits, RoutingInputs())
    # balanced's weights are the softmax's: it computes probs anyway; neither computes the load
    assert ops.counts["softmax"] == 1 and ops.counts["scatter"] == 1
    with AtenCounter() as ops:
        probs, load = routing.probs, routing.load
        assert routing.probs is probs and routing.load is load  # computed once
    assert ops.counts["scatter"] == 1
    torch.testing.assert_close(probs, logits.softmax(-1))
    torch.testing.assert_close(load, (routing.weights > 0).float() / 2)


def test_deferred_fields_read_on_the_class_and_have_no_default():
    """``Routing.probs`` read on the class gives its descriptor (torch.compile's guards read it so; an
    AttributeError there broke compiling a training step on torch 2.11), and the fields stay required."""
    assert isinstance(Routing.probs, Deferrable) and isinstance(Routing.load, Deferrable)
    assert [f.name for f in dataclasses.fields(Routing)][:4] == ["weights", "probs", "logits", "load"]
    with pytest.raises(TypeError, match="load"):
        Routing(weights=torch.ones(1, 2), probs=torch.ones(1, 2), logits=torch.ones(1, 2))


def test_router_losses_compute_deferred_fields_once_for_all_layers():
    """stack_field runs a deferred softmax / load once on all layers' inputs; the same values as layer by layer."""
    router = make_router(n=6, k=2).train()
    routings = [router.gate(torch.randn(3, 5, 6), RoutingInputs()) for _ in range(4)]
    with AtenCounter() as ops:
        probs, load = stack_field(routings, "probs"), stack_field(routings, "load")
    assert ops.counts["softmax"] == 1 and ops.counts["scatter"] == 1
    assert probs.shape == load.shape == (4, 15, 6)
    torch.testing.assert_close(probs, torch.stack([r.logits.softmax(-1).reshape(15, 6) for r in routings]))
    torch.testing.assert_close(load, torch.stack([((r.weights > 0).float() / 2).reshape(15, 6) for r in routings]))
    read = routings[1].probs  # one layer's field already read: the layers are stacked one by one, same values
    torch.testing.assert_close(stack_field(routings, "probs")[1], read.reshape(15, 6))
    torch.testing.assert_close(stack_field(routings, "probs"), probs)
