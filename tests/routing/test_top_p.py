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


def test_top_p_one_keeps_every_expert_of_some_probability():
    # the fp32 running sum reached 1.0 before the last experts: top_p=1 dropped experts whose p was small, not zero
    gate = router_of("top_p", num_experts=4, top_k=4, top_p=1.0)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0, 0] = 17.0  # logits [17, 0, 0, 0]: p = 1 - 1.2e-7 and 4e-8 three times
    routing = gate(torch.nn.functional.one_hot(torch.tensor([0]), 16).float())
    assert (routing.weights > 0).all()
    torch.testing.assert_close(routing.load, torch.full((1, 4), 0.25))
    tiny = router_of("top_p", num_experts=4, top_k=4, top_p=1e-9)  # the most likely expert alone, never none
    assert ((tiny(torch.randn(8, 16)).weights > 0).sum(-1) == 1).all()
