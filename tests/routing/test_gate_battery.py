"""The model battery for the token-choice gates (top_k's variants, switch, expert_choice, balanced, top_p, hierarchical,
dselect_k, cosine, hash, dense with a temperature): on tiny Llama and BERT each starts at the base model (where it
may), trains, gets gradients in its router and experts, and saves and reloads with identical logits. soft_merge and
soft_tokens run the battery in their own files; each gate's reference implementation is in test_<gate>.py.

On CUDA (skipped elsewhere): no gate, routing level or router loss makes a host sync, and bf16 Llamas train and
generate the same with and without a KV cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_round_trip, make_batch, make_model, make_router
from peft import get_peft_model

import mope
from mope.routing import ROUTERS, RoutingInputs

ROWS = {
    "top_k_topk_then_softmax": {"top_k_order": "topk_then_softmax"},
    "top_k_unnormalised": {"top_k_order": "softmax_then_topk_unnormalised"},
    "top_k_noisy": {"router_noise": True},
    "top_k_capacity_sequence": {"capacity_factor": 1.0},
    "top_k_capacity_bpr": {"capacity_factor": 1.0, "capacity_policy": "bpr"},
    "top_k_capacity_random_second": {"capacity_factor": 1.0, "capacity_policy": "random_second"},
    "switch": {"router": "switch", "capacity_factor": 0.75},
    "expert_choice": {"router": "expert_choice", "allow_noncausal_routing": True},
    "balanced": {"router": "balanced"},
}


def sparse_config(model: str, **kwargs) -> mope.MoPEConfig:
    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    base = {"target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4}
    return mope.MoPEConfig(task_type=task, **{**base, **kwargs})


@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("row", list(ROWS))
def test_gate_trains_and_round_trips(row, model_name, tmp_path):
    torch.manual_seed(0)
    batch = make_batch(model_name, pad=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = make_model(model_name)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = get_peft_model(base, sparse_config(model_name, **ROWS[row]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=0, atol=0)

    routers = [m for m in model.modules() if isinstance(m, mope.Router)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        out = model(**batch)
        out.loss.backward()
        assert all(r.weight.grad is not None and torch.isfinite(r.weight.grad).all() for r in routers)
        if ROWS[row].get("router_noise"):
            assert any(r.noise_weight.grad.abs().sum() > 0 for r in routers)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert min(losses[-3:]) < losses[0], losses

    assert_round_trip(model, model_name, tmp_path)


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
    """A gate with its NEW_GATES options (top_k as given), scoring weight drawn N(0, 1); conftest.router_of has no defaults."""
    kwargs = {**NEW_GATES.get(router, {}), "num_experts": num_experts, "top_k": top_k, "router": router, **extra}
    config = mope.MoPEConfig(**kwargs)
    torch.manual_seed(0)
    gate = ROUTERS[router](16, num_experts, top_k, config)
    if hasattr(gate, "weight"):
        with torch.no_grad():
            gate.weight.normal_(0, 1.0)
    return gate


SYNC_ROWS = [
    {"router": "top_k", "capacity_factor": 1.0, "capacity_policy": policy}
    for policy in ("sequence", "bpr", "random_second")
] + [
    {"router": "top_k", "router_noise": True},
    {"router": "switch"},
    {"router": "expert_choice"},
    {"router": "balanced", "k": 3},
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are detectable on CUDA only")
@pytest.mark.parametrize("kwargs", SYNC_ROWS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_gates_make_no_host_sync(kwargs):
    router = make_router(**kwargs, n=6).cuda()
    x = torch.randn(4, 32, 8, device="cuda")
    mask = torch.ones(4, 32, dtype=torch.long, device="cuda")
    mask[0, :5] = 0
    for training in (True, False):
        router.train(training)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            routing = router(x, RoutingInputs(token_mask=mask))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert routing.weights.shape == (4, 32, 6)


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
