"""Expert types (mope.experts): every bank against a reference loop written from its formula, on tiny Llama and BERT;
starts at the base model, trains and round-trips; trainable parameters counted by hand.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_round_trip, make_batch, make_model
from peft import get_peft_model
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


@pytest.mark.parametrize(
    "routing",
    [{"capacity_factor": 0.5}, {"router": "switch"}, {"router": "expert_choice", "capacity_factor": 1.0}],
    ids=["top_k-capacity", "switch", "expert_choice"],
)
@pytest.mark.parametrize("name", list(EXPERT_KWARGS))
def test_a_token_no_expert_takes_passes_through_the_base(name, routing):
    # capacity and expert choice leave tokens with all-zero gates: (IA)3's g L / sum(g) was 0/0 there (NaN logits)
    batch = {k: v for k, v in make_batch("bert", batch=4, seq=8).items() if k != "labels"}
    base = make_model("bert")
    with torch.no_grad():
        want = base(**batch).logits
    kwargs = {"num_experts": 4, "top_k": 1, "r": 4, **EXPERT_KWARGS[name], **routing}
    model = get_peft_model(base, mope.MoPEConfig(task_type="SEQ_CLS", target_modules="all-linear", **kwargs))
    dropped = []
    for layer in (m for m in model.modules() if isinstance(m, MoPELayer)):
        layer.mope_router["default"].register_forward_hook(
            lambda module, args, out: dropped.append((out.weights.sum(-1) == 0).sum().item())
        )
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)
    assert sum(dropped) > 0  # some tokens took no expert
    model.train()
    assert torch.isfinite(model(**batch).logits).all()


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


def test_activation_table_is_used():
    assert set(ACTIVATIONS) >= {"relu", "gelu", "silu", "tanh"}


def test_ia3_on_a_module_it_cannot_scale_is_refused():
    base = make_model("llama")
    before = {n: type(m) for n, m in base.named_modules()}
    config = mope.MoPEConfig(target_modules=["embed_tokens"], expert_type="ia3", num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="embed_tokens"):
        get_peft_model(base, config)
    assert {n: type(m) for n, m in base.named_modules()} == before
