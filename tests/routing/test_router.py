"""The Router base class and Routing (mope.routing.base): routers score in fp32 under autocast; a routing's probs and
load cost nothing until read, are computed once, and are batched over layers by stack_field.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from conftest import make_model, make_router
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import mope
from mope.routing import ROUTERS, RoutingInputs
from mope.routing.base import Deferrable, Routing, stack_field


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
