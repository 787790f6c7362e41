"""Expert choice (mope.routing.expert_choice): each expert picks its tokens, checked against a reference loop; the
gate refuses causal inference unless allowed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_router, padded_mask, skewed_logits

from mope.routing import RoutingInputs


def reference_expert_choice(logits, mask, factor):
    flat = logits.reshape(-1, logits.shape[-1]).tolist()
    real = mask.reshape(-1).tolist()
    n = len(flat[0])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in flat]
    tokens = [t for t in range(len(flat)) if real[t]]
    c = min(math.ceil(factor * len(tokens) / n), len(tokens))
    out = [[0.0] * n for _ in flat]
    for e in range(n):
        for t in sorted(tokens, key=lambda t: (-probs[t][e], t))[:c]:
            out[t][e] = probs[t][e]
    return torch.tensor(out), c


@pytest.mark.parametrize("factor", [None, 0.5, 1.0, 3.0, 10.0])
def test_expert_choice_matches_reference(factor):
    logits, mask = skewed_logits(3, 7, 4, seed=7), padded_mask(3, 7)
    router = make_router("expert_choice", 4, 2, capacity_factor=factor)
    router.train()
    routing = router.gate(logits, RoutingInputs(token_mask=mask))
    want, c = reference_expert_choice(logits, mask, factor or 2.0)  # None -> top_k
    torch.testing.assert_close(routing.weights.reshape(-1, 4), want, rtol=1e-5, atol=1e-7)
    assert ((routing.weights > 0).sum(dim=(0, 1)) == c).all()  # every expert takes exactly c tokens
    loads = routing.load.sum(-1)[(routing.weights > 0).any(-1)]
    torch.testing.assert_close(loads, torch.ones_like(loads))
