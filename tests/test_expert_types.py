"""Expert types and placement: every bank against a reference loop, on tiny Llama and BERT."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_round_trip, make_batch, make_model
from peft import PeftModel, get_peft_model
from torch import nn

import mope
from mope.experts import ACTIVATIONS
from mope.layer import MoPELayer

EXPERT_KWARGS = {
    "lora": {},
    "lora_shared_a": {"expert_type": "lora_shared_a"},
    "adapter_parallel": {"expert_type": "adapter", "adapter_placement": "parallel", "adapter_activation": "gelu"},
    "adapter_series": {"expert_type": "adapter", "adapter_placement": "series"},
    "ia3": {"expert_type": "ia3", "feedforward_modules": ["down_proj", "output.dense"]},
    "lora_shared_experts": {"num_shared_experts": 1},
}


def reference_output(layer: MoPELayer, x: torch.Tensor) -> torch.Tensor:
    """Plain loops over experts, written from each expert type's formula."""
    bank = layer.mope_experts["default"]
    router = layer.mope_router["default"]
    settings = layer.mope_settings["default"]
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    if type(router).__name__ == "DenseRouter":
        routed = probs
    else:
        top = probs.topk(settings.top_k, dim=-1)
        routed = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    gate = torch.cat([routed, torch.ones(*routed.shape[:-1], settings.num_shared)], dim=-1)
    kind = type(bank).__name__
    if kind == "IA3ExpertBank":
        scale = sum(gate[..., e : e + 1] * bank.ia3_l[e] for e in range(bank.num_experts)) / gate.sum(-1, keepdim=True)
        return layer.base_layer(x * scale) if bank.scales_input else layer.base_layer(x) * scale
    out = layer.base_layer(x)
    total = torch.zeros_like(out)
    for e in range(bank.num_experts):
        g = gate[..., e : e + 1]
        if kind == "LoRAExpertBank":
            expert = (x @ bank.lora_A[e].T) @ bank.lora_B[e] * bank.scaling
        elif kind == "SharedALoRAExpertBank":
            expert = (x @ bank.lora_A.T) @ bank.lora_B[e] * bank.scaling
        else:  # adapter
            z = out if bank.series else x
            expert = (
                bank.activation(z @ bank.down[e].T + bank.down_bias[e]) @ bank.up[e] + bank.up_bias[e]
            ) * bank.scaling
        total = total + g * expert
    return out + total


def config_for(name: str, model: str, router: str, **extra) -> mope.MoPEConfig:
    kwargs = {"num_experts": 4, "top_k": 2, "r": 4, "router": router, **EXPERT_KWARGS[name], **extra}
    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    return mope.MoPEConfig(task_type=task, target_modules="all-linear", **kwargs)


@pytest.mark.parametrize("router", ["top_k", "dense"])
@pytest.mark.parametrize("name", list(EXPERT_KWARGS))
def test_bank_matches_reference_loop(name, router):
    config = config_for(name, "llama", router, init_weights=False)
    model = get_peft_model(make_model("llama"), config)
    layers = [m for m in model.modules() if isinstance(m, MoPELayer)]
    x = torch.randn(2, 5, 64)
    checked = 0
    for layer in layers:
        if layer.in_features != 64:
            continue
        with torch.no_grad():
            layer.mope_router["default"].weight.normal_(0, 1.0)
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked >= 4
    if name == "ia3":
        assert any(m.mope_experts["default"].scales_input for m in layers)


@pytest.mark.parametrize("router", ["top_k", "dense"])
@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("name", list(EXPERT_KWARGS))
def test_starts_at_base_trains_and_round_trips(name, model_name, router, tmp_path):
    batch = make_batch(model_name, pad=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = make_model(model_name)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = get_peft_model(base, config_for(name, model_name, router))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=0, atol=0)

    lr = 5e-2 if name == "ia3" else 5e-3  # (IA)3 scales have few parameters and need a larger step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(30):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert min(losses[-5:]) < 0.9 * losses[0], losses

    assert_round_trip(model, model_name, tmp_path)


def linear_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    return [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    ]


@pytest.mark.parametrize("name", list(EXPERT_KWARGS))
def test_trainable_parameters_match_hand_count(name):
    n, r = 4, 4
    expected = 0
    for module, d_in, d_out in linear_shapes(make_model("llama")):
        router = (n - (1 if name == "lora_shared_experts" else 0)) * d_in
        if name in ("lora", "lora_shared_experts"):
            bank = n * r * (d_in + d_out)
        elif name == "lora_shared_a":
            bank = r * d_in + n * r * d_out
        elif name.startswith("adapter"):
            d_z = d_out if name == "adapter_series" else d_in
            bank = n * (r * d_z + r + r * d_out + d_out)
        else:
            bank = n * (d_in if module.endswith("down_proj") else d_out)
        expected += bank + router
    model = get_peft_model(make_model("llama"), config_for(name, "llama", "top_k"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected


def test_per_module_patterns_set_expert_counts():
    config = mope.MoPEConfig(
        target_modules="all-linear",
        num_experts=2,
        top_k=1,
        r=2,
        num_experts_pattern={r"layers\.1\..*": 6},
        top_k_pattern={r"layers\.1\..*": 3},
    )
    model = get_peft_model(make_model("llama"), config)
    for name, m in model.named_modules():
        if isinstance(m, MoPELayer):
            want = (6, 3) if ".layers.1." in name else (2, 1)
            s = m.mope_settings["default"]
            assert (s.num_experts, s.top_k) == want, name
            assert m.mope_experts["default"].lora_A.shape[0] == want[0]


def test_mixed_placement_single_expert_on_attention():
    config = mope.MoPEConfig(
        target_modules="all-linear",
        num_experts=4,
        top_k=2,
        r=2,
        num_experts_pattern={"self_attn\\..*": 1},
        top_k_pattern={"self_attn\\..*": 1},
    )
    model = get_peft_model(make_model("llama"), config)
    attn = model.base_model.model.model.layers[0].self_attn.q_proj
    assert attn.mope_settings["default"].num_experts == 1
    assert attn.fold_blocker("default") is None  # a plain LoRA: mergeable
    assert model.base_model.model.model.layers[0].mlp.up_proj.mope_settings["default"].num_experts == 4


def test_block_level_routing_runs_one_router_per_block(tmp_path):
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules=["gate_proj", "up_proj", "down_proj"],
        num_experts=4,
        top_k=2,
        r=2,
        router_blocks=["mlp"],
        init_weights=False,
    )
    model = get_peft_model(make_model("llama"), config)
    mlp = model.base_model.model.model.layers[0].mlp
    assert "default" in mlp.gate_proj.mope_router
    assert "default" not in mlp.up_proj.mope_router and "default" not in mlp.down_proj.mope_router
    calls = []
    mlp.gate_proj.mope_router["default"].register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch("llama")
    model.train()
    out = model(**batch)
    assert len(calls) == 1
    # the followers used exactly the leader's gate weights
    x = torch.randn(1, 3, 64)
    routing = mlp.gate_proj.mope_router["default"](x)
    model.base_model.routing_context.block_routings[("default", "model.layers.0.mlp")] = routing
    bank = mlp.up_proj.mope_experts["default"]
    want = (
        mlp.up_proj.base_layer(x)
        + torch.einsum("btn,btno->bto", routing.weights, torch.einsum("bti,nri,nro->btno", x, bank.lora_A, bank.lora_B))
        * bank.scaling
    )
    torch.testing.assert_close(mlp.up_proj(x), want, rtol=1e-5, atol=1e-5)
    # one load-balancing record per block, not per projection
    assert out.aux_loss is not None
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_shared_experts": 4}, "num_shared_experts"),
        ({"num_shared_experts": 3, "top_k": 2}, "top_k"),
        ({"expert_type": "adapter", "adapter_placement": "middle"}, "adapter_placement"),
        ({"expert_type": "adapter", "adapter_activation": "swish2"}, "adapter_activation"),
        ({"expert_type": "adapter", "adapter_scaling": 0}, "adapter_scaling"),
        ({"feedforward_modules": ["down_proj"]}, "feedforward_modules"),
        ({"num_experts_pattern": {"mlp.*": 0}}, "num_experts_pattern"),
        ({"top_k_pattern": {"(": 1}}, "top_k_pattern"),
    ],
)
def test_invalid_config_combinations(kwargs, field):
    with pytest.raises(ValueError, match=f"MoPEConfig.{field}"):
        mope.MoPEConfig(**{"num_experts": 4, "top_k": 1, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts_pattern": {"no_such_module": 2}}, "num_experts_pattern"),
        ({"top_k_pattern": {"mlp\\..*": 5}}, "top_k"),
        ({"expert_type": "ia3", "feedforward_modules": ["no_such_proj"]}, "feedforward_modules"),
        ({"router_blocks": ["no_such_block"]}, "router_blocks"),
    ],
)
def test_invalid_placement_is_refused_and_model_untouched(kwargs, field):
    base = make_model("llama")
    before = {n: type(m) for n, m in base.named_modules()}
    config = mope.MoPEConfig(target_modules="all-linear", num_experts=4, top_k=1, r=2, **kwargs)
    with pytest.raises(ValueError, match=field):
        get_peft_model(base, config)
    assert {n: type(m) for n, m in base.named_modules()} == before


def test_activation_table_is_used():
    assert set(ACTIVATIONS) >= {"relu", "gelu", "silu", "tanh"}


def test_ia3_on_a_module_it_cannot_scale_is_refused():
    base = make_model("llama")
    before = {n: type(m) for n, m in base.named_modules()}
    config = mope.MoPEConfig(target_modules=["embed_tokens"], expert_type="ia3", num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="embed_tokens"):
        get_peft_model(base, config)
    assert {n: type(m) for n, m in base.named_modules()} == before
