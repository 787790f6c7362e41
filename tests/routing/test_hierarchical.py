"""The hierarchical gate (mope.routing.hierarchical) against a reference loop: a softmax over groups, then over the
experts of the chosen group; groups that do not divide the experts evenly are refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import router_of

import mope


def test_hierarchical_matches_reference_loop():
    gate = router_of("hierarchical", num_experts=6, top_k=2, num_groups=3)
    x = torch.randn(30, 16)
    routing = gate(x)
    scores = x @ gate.weight.T
    for t in range(x.shape[0]):
        group_p = torch.softmax(scores[t, :3], dim=0)
        g = int(group_p.argmax())
        inside = torch.softmax(scores[t, 3 + 2 * g : 5 + 2 * g], dim=0)  # groups of 2
        want = torch.zeros(6)
        want[2 * g : 2 * g + 2] = group_p[g] * inside / inside.sum()
        torch.testing.assert_close(routing.weights[t], want)
        full = torch.cat([group_p[i] * torch.softmax(scores[t, 3 + 2 * i : 5 + 2 * i], 0) for i in range(3)])
        torch.testing.assert_close(routing.probs[t], full)


def test_hierarchical_refuses_uneven_groups():
    with pytest.raises(ValueError, match="num_groups"):
        mope.MoPEConfig(num_experts=6, top_k=2, router="hierarchical", num_groups=4)
    with pytest.raises(ValueError, match="num_groups"):
        mope.MoPEConfig(num_experts=6, top_k=3, router="hierarchical", num_groups=3)
