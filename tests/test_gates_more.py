"""top_p, hierarchical, dselect_k, cosine and hash gates (and dense's temperature).

Each gate runs the model battery (forward/backward on tiny Llama and BERT, save/load with
identical logits) and is checked against a reference written from its formula with loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_round_trip, make_batch, make_model
from peft import get_peft_model

import mope
from mope.layer import MoPELayer
from mope.routing import ROUTERS, RoutingInputs
from mope.routing.hash import HASH_PRIME

# router -> extra config; BERT's pooler sees no tokens, so hash adapts the encoder only.
NEW_GATES = {
    "top_p": {"top_p": 0.5, "top_k": 3},
    "hierarchical": {"num_groups": 2},
    "dselect_k": {},
    "cosine": {"cosine_dim": 8},
    "hash": {"aux_loss_coef": 0.0, "z_loss_coef": 0.0},
    "dense": {"router_temperature": 0.5},
}


def config_for(model: str, router: str, **extra) -> mope.MoPEConfig:
    kwargs = {"num_experts": 4, "top_k": 2, "r": 4, "router": router, "init_weights": False}
    kwargs.update(NEW_GATES.get(router, {}))
    kwargs.update(extra)
    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    targets = "all-linear"
    if router == "hash" and model == "bert":
        targets = r".*encoder.*(query|key|value|dense)$"
    return mope.MoPEConfig(task_type=task, target_modules=targets, **kwargs)


@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("router", list(NEW_GATES))
def test_forward_backward_and_round_trip(router, model_name, tmp_path):
    model = get_peft_model(make_model(model_name), config_for(model_name, router))
    model.train()
    out = model(**make_batch(model_name, pad=2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    routers = [p for n, p in model.named_parameters() if "mope_router" in n]
    if router == "hash":
        assert not routers  # nothing learned
    else:
        assert routers and any(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    assert_round_trip(model, model_name, tmp_path)


def router_of(router: str, num_experts: int = 6, top_k: int = 2, **extra):
    kwargs = {**NEW_GATES.get(router, {}), "num_experts": num_experts, "top_k": top_k, "router": router, **extra}
    config = mope.MoPEConfig(**kwargs)
    torch.manual_seed(0)
    gate = ROUTERS[router](16, num_experts, top_k, config)
    if hasattr(gate, "weight"):
        with torch.no_grad():
            gate.weight.normal_(0, 1.0)
    return gate


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


def test_hash_matches_reference_and_ignores_hidden_states():
    gate = router_of("hash", num_experts=5)
    ids = torch.randint(0, 1000, (3, 7))
    inputs = RoutingInputs(token_ids=ids)
    routing = gate(torch.randn(3, 7, 16), inputs)
    a, b = gate.multiplier, gate.offset
    for i, t in enumerate(ids.flatten().tolist()):
        expert = ((a * t + b) % HASH_PRIME) % 5
        assert routing.weights.reshape(-1, 5)[i].tolist() == [float(e == expert) for e in range(5)]
    torch.testing.assert_close(gate(torch.randn(3, 7, 16), inputs).weights, routing.weights)
    assert router_of("hash", num_experts=5, hash_seed=1).multiplier != a
    with pytest.raises(ValueError, match="token id"):
        gate(torch.randn(3, 7, 16), RoutingInputs())


def test_hash_needs_token_ids_in_the_model():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, router="hash")
    model = get_peft_model(make_model("llama"), config)
    batch = make_batch("llama")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="token id"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    t5 = get_peft_model(
        make_model("t5"), mope.MoPEConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q"], num_experts=4, router="hash")
    )
    t5_batch = make_batch("t5")
    with pytest.raises(ValueError, match="decoder_input_ids"):
        t5(**t5_batch)  # T5 builds its decoder ids from labels internally: the hook never sees them
    t5(**t5_batch, decoder_input_ids=torch.randint(1, 128, (2, 4)))


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


def test_dense_temperature_and_top_k_temperature():
    gate = router_of("dense", num_experts=4, router_temperature=0.5)
    x = torch.randn(10, 16)
    torch.testing.assert_close(gate(x).weights, torch.softmax(x @ gate.weight.T / 0.5, -1))
    config = mope.MoPEConfig(num_experts=4, top_k=2, router_temperature=3.0)
    top_k = ROUTERS["top_k"](16, 4, 2, config)
    torch.testing.assert_close(top_k(x).probs, torch.softmax(x @ top_k.weight.T / 3.0, -1))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"router_temperature": 0}, "router_temperature"),
        ({"router_temperature": float("inf")}, "router_temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_groups": 0}, "num_groups"),
        ({"dselect_gamma": -1.0}, "dselect_gamma"),
        ({"cosine_dim": 0}, "cosine_dim"),
        ({"cosine_init_temperature": 0.001}, "cosine_init_temperature"),
        ({"hash_seed": -1}, "hash_seed"),
        ({"router": "hash", "routing_level": "sequence"}, "routing_level"),
        ({"router": "cosine", "router_noise": True}, "router_noise"),
        ({"routing_level": "paragraph"}, "routing_level"),
        ({"routing_level": "task"}, "num_tasks"),
        ({"num_tasks": 3}, "num_tasks"),
        ({"importance_loss_coef": -1.0}, "importance_loss_coef"),
        ({"entropy_loss_coef": math.nan}, "entropy_loss_coef"),
        ({"localized_balance_coef": -0.1}, "localized_balance_coef"),
        ({"localized_balance_delta": 1.0}, "localized_balance_delta"),
        ({"router_schedule_steps": -1}, "router_schedule_steps"),
        ({"router_schedule_steps": 10}, "router_schedule_steps"),
        ({"router_schedule_start_top_k": 3}, "router_schedule_start"),
        ({"router_schedule_steps": 10, "router_schedule_start_top_k": 9}, "router_schedule_start_top_k"),
        ({"router_schedule_steps": 10, "router_schedule_start_temperature": 0.0}, "router_schedule_start_temperature"),
        ({"router_schedule_steps": 10, "router_schedule_start_top_k": 4, "router": "hash"}, "start_top_k"),
        ({"router_schedule_counter": "epoch"}, "router_schedule_counter"),
    ],
)
def test_invalid_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        mope.MoPEConfig(num_experts=4, top_k=2, **kwargs)


def test_entropy_coefficient_may_be_negative_and_is_counted():
    config = config_for("llama", "dense", entropy_loss_coef=-0.5, aux_loss_coef=0.0, z_loss_coef=0.0)
    model = get_peft_model(make_model("llama"), config)
    model.train()
    out = model(**make_batch("llama"))
    layers = sum(isinstance(m, MoPELayer) for m in model.modules())
    assert layers and out.aux_loss < 0  # - 0.5 * entropy (entropy > 0)
    assert out.aux_loss > -0.5 * math.log(4) - 1e-6


CUDA_ROWS = [(router, "token") for router in NEW_GATES] + [
    ("top_k", "sequence"),
    ("dselect_k", "sequence"),
    ("top_p", "task"),
    ("cosine", "task"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are detectable on CUDA only")
@pytest.mark.parametrize(("router", "level"), CUDA_ROWS)
def test_new_gates_levels_and_losses_make_no_host_sync(router, level):
    extra = {"routing_level": level, "num_tasks": 3} if level == "task" else {"routing_level": level}
    gate = router_of(router, num_experts=6, **extra)
    features = 3 if level == "task" else 16
    if features != 16:
        gate = ROUTERS[router](
            features, 6, 2, mope.MoPEConfig(num_experts=6, router=router, **NEW_GATES.get(router, {}), **extra)
        )
    gate = gate.cuda()
    x = torch.randn(4, 32, 16, device="cuda")
    mask = torch.ones(4, 32, dtype=torch.long, device="cuda")
    mask[0, :5] = 0
    inputs = RoutingInputs(
        token_mask=mask,
        token_ids=torch.randint(0, 128, (4, 32), device="cuda"),
        task_ids=torch.tensor([0, 1, 2, 1], device="cuda"),
        decisions=mope.routing.levels.DecisionCache(),
    )
    groups = torch.tensor([0, 1, 1, 0], device="cuda")
    for training in (True, False):
        gate.train(training)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            routing = gate(x, inputs)
            mope.losses.importance_loss(routing, mask)
            mope.losses.entropy_loss(routing, mask)
            mope.losses.localized_balance_loss(routing, mask, groups, num_groups=2, delta=0.1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert routing.weights.shape == (4, 32, 6) and torch.isfinite(routing.weights).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("router", "level"), CUDA_ROWS)
def test_bf16_llama_on_cuda_trains_and_generates(router, level):
    extra = {"num_tasks": 3} if level == "task" else {}
    model = get_peft_model(make_model("llama"), config_for("llama", router, routing_level=level, **extra)).cuda()
    batch = {k: v.cuda() for k, v in make_batch("llama", pad=2).items()}
    ids = {"mope_task_ids": torch.tensor([0, 2], device="cuda")} if level == "task" else {}
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch, **ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval()
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    cached = model.generate(**prompt, **ids, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(**prompt, **ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
