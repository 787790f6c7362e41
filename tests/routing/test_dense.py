"""The router temperature: the dense gate's softmax over all experts (mope.routing.dense) and top_k's probabilities."""

from __future__ import annotations

import torch
from conftest import router_of

import mope
from mope.routing import ROUTERS


def test_dense_temperature_and_top_k_temperature():
    gate = router_of("dense", num_experts=4, router_temperature=0.5)
    x = torch.randn(10, 16)
    torch.testing.assert_close(gate(x).weights, torch.softmax(x @ gate.weight.T / 0.5, -1))
    config = mope.MoPEConfig(num_experts=4, top_k=2, router_temperature=3.0)
    top_k = ROUTERS["top_k"](16, 4, 2, config)
    torch.testing.assert_close(top_k(x).probs, torch.softmax(x @ top_k.weight.T / 3.0, -1))
