"""DSelect-k (mope.routing.dselect_k) against the paper's formula with loops, and its entropy regulariser, which makes
the selectors binary (at most k experts per token).
"""

from __future__ import annotations

import pytest
import torch
from conftest import router_of

import mope


def dselect_reference(gate, x: torch.Tensor) -> torch.Tensor:
    """DSelect-k from the paper's formula, with codes >= N folded onto expert c - N."""
    k, m, n, gamma = gate.num_selectors, gate.num_bits, gate.num_experts, gate.gamma
    scores = x @ gate.weight.T
    out = torch.zeros(x.shape[0], n)
    for t in range(x.shape[0]):
        z = scores[t, : k * m].reshape(k, m)
        mix = torch.softmax(scores[t, k * m :], 0)
        for i in range(k):
            for code in range(2**m):
                weight = torch.tensor(1.0)
                for j in range(m):
                    zz = z[i, j]
                    s = (
                        0.0
                        if zz <= -gamma / 2
                        else 1.0
                        if zz >= gamma / 2
                        else -2 * zz**3 / gamma**3 + 1.5 * zz / gamma + 0.5
                    )
                    bit = (code >> (m - 1 - j)) & 1
                    weight = weight * (s if bit else 1 - s)
                out[t, code % n] += mix[i] * weight
    return out


@pytest.mark.parametrize("num_experts", [4, 3])
def test_dselect_k_matches_reference(num_experts):
    gate = router_of("dselect_k", num_experts=num_experts, top_k=2, dselect_gamma=2.0)
    with torch.no_grad():
        gate.weight.mul_(0.3)  # some smooth steps saturated, some not
    x = torch.randn(12, 16)
    routing = gate(x)
    torch.testing.assert_close(routing.weights, dselect_reference(gate, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(12))
    assert routing.selectors.shape == (12, 2, num_experts)


def test_dselect_k_entropy_regulariser_makes_selectors_binary():
    gate = router_of("dselect_k", num_experts=4, top_k=2)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    x = torch.randn(64, 16)
    for _ in range(150):
        optimizer.zero_grad()
        mope.losses.entropy_loss(gate(x), None).backward()
        optimizer.step()
    used = (gate(x).weights > 1e-6).sum(-1)
    assert used.max() <= 2  # at most k experts per token once the selectors are one-hot
