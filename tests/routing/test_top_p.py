"""The top-p gate (mope.routing.top_p) against a reference loop: the most probable experts until their mass reaches p,
at most top_k, renormalised.
"""

from __future__ import annotations

import torch
from conftest import router_of


def test_top_p_matches_reference_loop():
    gate = router_of("top_p", num_experts=6, top_k=3, top_p=0.5)
    x = torch.randn(40, 16)
    got = gate(x).weights
    probs = torch.softmax(x @ gate.weight.T, dim=-1)
    sizes = set()
    for t in range(x.shape[0]):
        order = sorted(range(6), key=lambda e: -probs[t, e].item())
        kept, mass = [], 0.0
        for e in order:
            if mass >= 0.5 or len(kept) == 3:
                break
            kept.append(e)
            mass += probs[t, e].item()
        want = torch.zeros(6)
        want[kept] = probs[t, kept] / probs[t, kept].sum()
        torch.testing.assert_close(got[t], want)
        sizes.add(len(kept))
    assert len(sizes) > 1  # the number of experts really varies per token
