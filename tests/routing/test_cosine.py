"""The cosine gate (mope.routing.cosine) against its formula: cosine similarity between the projected token and each
expert's embedding, over a learned temperature clamped at 0.01.
"""

from __future__ import annotations

import torch
from conftest import router_of


def test_cosine_matches_reference():
    gate = router_of("cosine", num_experts=5, top_k=2, cosine_dim=4, cosine_init_temperature=0.5)
    x = torch.randn(20, 16)
    routing = gate(x)
    for t in range(x.shape[0]):
        h = gate.weight @ x[t]
        scores = torch.stack(
            [h.dot(e) / (h.norm() * e.norm()) / 0.5 for e in gate.expert_embeddings]  # cos / tau
        )
        torch.testing.assert_close(routing.logits[t], scores, rtol=1e-5, atol=1e-5)
        probs = torch.softmax(scores, 0)
        top = probs.argsort(descending=True)[:2]
        want = torch.zeros(5)
        want[top] = probs[top] / probs[top].sum()
        torch.testing.assert_close(routing.weights[t], want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        gate.log_scale.fill_(10.0)  # tau is clamped at 0.01
    assert gate(x).logits.abs().max() <= 100.0 + 1e-3
