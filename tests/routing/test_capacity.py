"""Expert capacity (mope.routing.capacity) against plain-Python reference loops: top_k's policies, switch (top-1 with
capacity), the limit never exceeded, padding taking no place, drop rates by position, when capacity applies.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import make_router, padded_mask, skewed_logits

import mope
from mope.routing import ROUTERS, Routing, RoutingInputs, drop_rate_by_position
from mope.routing.capacity import expert_capacity


def reference_token_choice(logits, mask, k, factor, policy, renormalise=True, uniforms=None):
    """Slot-major capacity with plain loops: returns (weights [T][N], dropped set of (t, e))."""
    flat = logits.reshape(-1, logits.shape[-1]).tolist()
    real = mask.reshape(-1).tolist()
    n = len(flat[0])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in flat]
    top = [sorted(range(n), key=lambda e, p=p: -p[e])[:k] for p in probs]
    weights = [
        [p[e] / (sum(p[j] for j in chosen) if renormalise else 1.0) for e in chosen]
        for p, chosen in zip(probs, top, strict=True)
    ]
    capacity = math.ceil(Fraction(str(factor)) * sum(real) * k / n)
    seq = logits.shape[1]
    tokens = sorted(range(len(flat)), key=lambda t: (t % seq, t // seq))  # position-major
    if policy == "bpr":
        tokens.sort(key=lambda t: -max(probs[t]))  # stable: ties stay position-major
    out = [[0.0] * n for _ in flat]
    dropped, count = set(), [0] * n
    for t in range(len(flat)):
        if not real[t]:  # padding keeps its choice and takes no place
            for s, e in enumerate(top[t]):
                out[t][e] = weights[t][s]
    for s in range(k):
        for t in tokens:
            if not real[t]:
                continue
            e = top[t][s]
            if uniforms is not None and s > 0 and not k * weights[t][s] / sum(weights[t]) > uniforms[t][s]:
                continue  # GShard: the second expert was not drawn
            if count[e] < capacity:
                count[e] += 1
                out[t][e] = weights[t][s]
            else:
                dropped.add((t, e))
    return torch.tensor(out), dropped


def check_against_reference(routing: Routing, want, dropped: set) -> None:
    n = routing.weights.shape[-1]
    torch.testing.assert_close(routing.weights.reshape(-1, n), want, rtol=1e-5, atol=1e-7)
    got = {tuple(pair) for pair in routing.dropped.reshape(-1, n).nonzero().tolist()}
    assert got == dropped
    assert dropped, "the case should overflow"


def test_capacity_is_the_exact_ceiling_for_the_factor_as_written():
    """In float32, 1.2 * 25 * 2 / 2 is just above 30 and its ceiling was 31: one place more than the docs say."""
    for factor in (0.3, 0.6, 1.1, 1.2, 2.2, 1.25, 2):
        for tokens in range(1, 130):
            for k, n in ((1, 2), (2, 2), (2, 8), (1, 64)):
                want = math.ceil(Fraction(str(factor)) * tokens * k / n)
                assert expert_capacity(factor, torch.tensor(tokens), k, n).item() == want, (factor, tokens, k, n)


@pytest.mark.parametrize("policy", ["sequence", "bpr", "random_second"])
@pytest.mark.parametrize("factor", [0.5, 1.0])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_capacity_matches_reference(policy, factor, k):
    logits, mask = skewed_logits(3, 7, 4, seed=k), padded_mask(3, 7)
    router = make_router("top_k", 4, k, capacity_factor=factor, capacity_policy=policy)
    router.train()
    uniforms = None
    if policy == "random_second":
        torch.manual_seed(11)
        uniforms = torch.rand(21, k).tolist()  # the draw the gate makes after the same seed
        torch.manual_seed(11)
    routing = router.gate(logits, RoutingInputs(token_mask=mask))
    want, dropped = reference_token_choice(logits, mask, k, factor, policy, uniforms=uniforms)
    check_against_reference(routing, want, dropped)


def test_random_second_in_eval_is_sequence_order():
    logits, mask = skewed_logits(3, 7, 4, seed=2), padded_mask(3, 7)
    router = make_router("top_k", 4, 2, capacity_factor=0.75, capacity_policy="random_second")
    router.eval()
    want, dropped = reference_token_choice(logits, mask, 2, 0.75, "sequence")
    check_against_reference(router.gate(logits, RoutingInputs(token_mask=mask)), want, dropped)


@pytest.mark.parametrize("factor", [None, 0.5, 1.0])
def test_switch_matches_reference(factor):
    logits, mask = skewed_logits(3, 7, 4, seed=5), padded_mask(3, 7)
    router = make_router("switch", 4, 2, capacity_factor=factor)  # top_k=2 is ignored: switch is top-1
    routing = router.gate(logits, RoutingInputs(token_mask=mask))
    want, dropped = reference_token_choice(logits, mask, 1, factor or 1.25, "sequence", renormalise=False)
    check_against_reference(routing, want, dropped)


@pytest.mark.parametrize("router_name", ["top_k", "switch"])
@pytest.mark.parametrize("policy", ["sequence", "bpr", "random_second"])
@pytest.mark.parametrize("factor", [0.3, 1.0, 1.5])
def test_capacity_is_never_exceeded(router_name, policy, factor):
    for seed in range(5):
        logits, mask = skewed_logits(4, 9, 5, seed=seed) * 2, padded_mask(4, 9)
        router = make_router(router_name, 5, 2, capacity_factor=factor, capacity_policy=policy)
        router.train()
        routing = router.gate(logits, RoutingInputs(token_mask=mask))
        k = router.top_k
        capacity = math.ceil(factor * mask.sum().item() * k / 5)
        kept = (routing.weights > 0) & mask.bool().unsqueeze(-1)
        assert (kept.sum(dim=(0, 1)) <= capacity).all()
        assert not (routing.dropped & ~mask.bool().unsqueeze(-1)).any()  # padding is never dropped
        assert not (routing.dropped & kept).any()


@pytest.mark.parametrize("router_name", ["top_k", "switch", "expert_choice"])
@pytest.mark.parametrize("policy", ["sequence", "bpr"])
def test_padding_takes_no_capacity(router_name, policy):
    """Real tokens route the same whether or not padding (which prefers the busiest expert) surrounds them."""
    real = skewed_logits(1, 10, 4, seed=3)
    padding = torch.zeros(1, 6, 4)
    padding[..., 0] = 10.0
    padded = torch.cat([padding, real], dim=1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 10)], dim=1).long()
    router = make_router(router_name, 4, 2, capacity_factor=0.75, capacity_policy=policy)
    router.train()
    alone = router.gate(real, RoutingInputs())
    among = router.gate(padded, RoutingInputs(token_mask=mask))
    torch.testing.assert_close(among.weights[:, 6:], alone.weights, rtol=0, atol=0)
    if router_name != "expert_choice":
        assert torch.equal(among.dropped[:, 6:], alone.dropped)
    else:
        assert (among.weights[:, :6] == 0).all()  # expert choice never picks padding


def test_drop_rate_by_position():
    weights = torch.zeros(2, 3, 4)
    dropped = torch.zeros(2, 3, 4, dtype=torch.bool)
    weights[:, :, 0] = 0.6  # every token asks for experts 0 and 1
    weights[:, :, 1] = 0.4
    weights[0, 2, 1], dropped[0, 2, 1] = 0.0, True  # position 2: row 0 lost one of two
    weights[1, 2, :2], dropped[1, 2, :2] = 0.0, True  # position 2: row 1 lost both (but is padding)
    weights[1, 1, 0], dropped[1, 1, 0] = 0.0, True
    routing = Routing(weights=weights, probs=weights, logits=weights, load=weights, dropped=dropped)
    torch.testing.assert_close(drop_rate_by_position(routing), torch.tensor([0.0, 0.25, 0.75]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(drop_rate_by_position(routing, mask), torch.tensor([0.0, 0.25, 0.5]))
    no_capacity = Routing(weights=weights, probs=weights, logits=weights, load=weights)
    torch.testing.assert_close(drop_rate_by_position(no_capacity, mask), torch.zeros(3))


def test_sequence_policy_drops_towards_the_end():
    logits = skewed_logits(8, 16, 4, seed=0) * 3
    router = make_router("switch", 4, 1, capacity_factor=1.0)
    rate = drop_rate_by_position(router.gate(logits, RoutingInputs()))
    assert rate[:4].mean() < rate[-4:].mean()


@pytest.mark.parametrize("router", ["top_k", "switch", "cosine"])
def test_capacity_drops_in_causal_training_and_in_encoder_eval_only(router):
    logits = torch.randn(2, 9, 4) * 3
    inputs = RoutingInputs(token_mask=torch.ones(2, 9))
    for task_type, training, drops in (
        ("CAUSAL_LM", True, True),
        ("CAUSAL_LM", False, False),
        ("SEQ_CLS", False, True),
    ):
        config = mope.MoPEConfig(task_type=task_type, num_experts=4, top_k=2, router=router, capacity_factor=0.25)
        gate = ROUTERS[router](8, 4, 2, config).train(training)
        routing = gate.gate(logits, inputs)
        assert bool(routing.dropped.any()) == drops, (task_type, training)
        assert routing.dropped.shape == (2, 9, 4)  # statistics still see the gate's capacity, with 0 drops


def test_a_capacity_factor_too_large_for_the_exact_ceiling_is_refused():
    # 1e20 overflowed int64 at the first forward (OverflowError naming no field); beyond N / k nothing drops anyway
    with pytest.raises(
        ValueError, match=r"MoPEConfig\.capacity_factor must be None or a finite number in \(0, 1e\+06\]"
    ):
        mope.MoPEConfig(router="switch", capacity_factor=1e20)
    assert mope.MoPEConfig(router="switch", capacity_factor=1e6).capacity_factor == 1e6
