"""Whole-FFN experts (MixLoRA) on gated MLP blocks, against a reference that runs each expert's FFN in full."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_round_trip, make_batch, make_model
from peft import get_peft_model
from torch.nn import functional as F

import mope
from mope.ffn_layer import MoPEFFNLayer


def ffn_model(init_weights: bool = False, **overrides):
    settings = {"num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8, "router_init_std": 1.0} | overrides
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["mlp"], init_weights=init_weights, **settings)
    return get_peft_model(make_model("llama"), config)


def ffn_layers(model) -> list[MoPEFFNLayer]:
    return [m for m in model.modules() if isinstance(m, MoPEFFNLayer)]


def expert_weight(base: torch.nn.Linear, bank, e: int) -> torch.Tensor:
    """W + s B_e^T A_e in nn.Linear layout, formed explicitly."""
    return base.weight + bank.scaling * bank.lora_B[e].t() @ bank.lora_A[e]


def reference_ffn(
    layer: MoPEFFNLayer, x: torch.Tensor, weights: torch.Tensor, adapter: str = "default"
) -> torch.Tensor:
    """``sum_e g_e FFN_e(x) + (1 - sum_e g_e) FFN(x)``, each expert a full MLP with its own weights."""
    mlp, bank = layer.base_layer, layer.mope_experts[adapter]
    out = (1 - weights.sum(-1, keepdim=True)) * mlp(x)
    for e in range(bank.num_experts):
        h = mlp.act_fn(F.linear(x, expert_weight(mlp.gate_proj, bank.gate, e))) * F.linear(
            x, expert_weight(mlp.up_proj, bank.up, e)
        )
        out = out + weights[..., e : e + 1] * F.linear(h, expert_weight(mlp.down_proj, bank.down, e))
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"router": "dense"},
        {"num_experts": 5, "num_shared_experts": 1},
        {"router": "switch", "capacity_factor": 0.5},  # drops tokens: they keep the frozen MLP
        {"top_k_order": "softmax_then_topk_unnormalised"},
    ],
    ids=["top2", "dense", "shared", "capacity", "unnormalised"],
)
def test_layer_equals_the_full_ffn_reference_in_value_and_gradient(overrides):
    model = ffn_model(**overrides)
    model.train()
    batch = make_batch("llama", pad=2)
    layer = ffn_layers(model)[0]
    x = torch.randn(2, 8, 64, requires_grad=True)
    mask = batch["attention_mask"]
    model.base_model.routing_context.begin({"attention_mask": mask}, collecting=False)
    got = layer(x)
    gate = layer.gate_weights("default", layer.mope_router["default"](x, layer.routing_inputs(x)).weights)
    want = reference_ffn(layer, x, gate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [p for p in layer.parameters() if p.requires_grad] + [x]
    probe = torch.randn_like(want)
    grads = torch.autograd.grad((got * probe).sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad((want * probe).sum(), params, allow_unused=True)
    for g, w in zip(grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_dropped_tokens_keep_the_frozen_mlp():
    model = ffn_model(router="switch", capacity_factor=0.25)
    model.train()
    layer = ffn_layers(model)[0]
    x = torch.randn(1, 16, 64)
    routing = layer.mope_router["default"](x, layer.routing_inputs(x))
    dropped = routing.weights.sum(-1) == 0
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(layer(x)[dropped], layer.base_layer(x)[dropped], rtol=0, atol=1e-6)


def test_frozen_projections_run_once_per_forward_not_k_times():
    """W2 (and W1, W3) see each token once: sum_e g_e W2 h_e = W2 sum_e g_e h_e."""
    model = ffn_model(top_k=2)
    mlp = ffn_layers(model)[0].base_layer
    rows: dict[str, list[int]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for name, seen in rows.items():
        getattr(mlp, name).register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0].shape[:-1].numel()))
    batch = make_batch("llama")
    model(**batch)
    tokens = batch["input_ids"].numel()
    assert rows == {"gate_proj": [tokens], "up_proj": [tokens], "down_proj": [tokens]}


def test_input_dropout_draws_one_mask_per_projection_for_all_experts():
    # as every LoRA bank (docs/concepts.md): each expert drew its own, so a token's k experts saw k masks
    model = ffn_model(top_k=2, lora_dropout=0.5).train()
    layer = ffn_layers(model)[0]
    bank = layer.mope_experts["default"]
    draws = {name: [] for name in ("gate", "up", "down")}
    for name, seen in draws.items():
        getattr(bank, name).dropout.register_forward_hook(lambda m, a, o, seen=seen: seen.append(o))
    batch = make_batch("llama")
    model(**batch)
    tokens = batch["input_ids"].numel()
    assert [len(seen) for seen in draws.values()] == [1, 1, 1]  # once per forward, not once per expert
    assert [seen[0].shape[0] for seen in draws.values()] == [tokens] * 3  # over every token of the layer
    assert not torch.equal(draws["gate"][0], draws["up"][0])  # two projections, two masks (as two LoRA layers)
    with torch.no_grad():  # and a reference with the same draws: each expert FFN on the masked inputs
        layer.eval()
        x = torch.randn(1, 3, layer.base_layer.gate_proj.in_features)
        weights = layer.mope_router["default"](x).weights
        torch.testing.assert_close(layer(x), reference_ffn(layer, x, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"num_experts": 5, "num_shared_experts": 1}], ids=["top2", "shared"])
def test_init_weights_starts_at_the_base_model(overrides):
    base = make_model("llama")
    batch = make_batch("llama", pad=2)
    with torch.no_grad():
        want = base(**batch).logits
        got = ffn_model(init_weights=True, **overrides)(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_trains_saves_and_loads(tmp_path):
    model = ffn_model(init_weights=True)
    model.train()
    batch = make_batch("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(**batch)
        assert out.aux_loss is not None and out.aux_loss > 0
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".mlp.mope_" in n for n in trained)
    assert_round_trip(model, "llama", tmp_path / "bundle")


def test_generate_with_cache_equals_without():
    model = ffn_model()
    model.eval()
    prompt = make_batch("llama", pad=2)
    prompt.pop("labels")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **kwargs)
        uncached = model.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_per_projection_and_block_targets_mix_in_one_model():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "mlp"], init_weights=False)
    model = get_peft_model(make_model("llama"), config)
    assert len(ffn_layers(model)) == 2
    assert sum(type(m) is mope.MoPELayer for m in model.modules()) == 4
    model(**make_batch("llama")).loss.backward()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"expert_type": "adapter"}, "whole-FFN experts are LoRA experts"),
        ({"router": "soft_merge", "routing_level": "sequence"}, "cannot drive whole-FFN experts"),
    ],
)
def test_unsupported_settings_are_refused_and_the_model_is_unchanged(overrides, message):
    base = make_model("llama")
    before = {name: type(m) for name, m in base.named_modules()}
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["mlp"], **overrides)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config)
    assert {name: type(m) for name, m in base.named_modules()} == before


def test_merge_is_refused_with_nothing_changed():
    model = ffn_model()
    batch = make_batch("llama")
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.raises(ValueError, match="whole-FFN experts"):
        model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


def test_collapse_to_lora_is_refused_naming_the_block(tmp_path):
    model = ffn_model()
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.mlp' has whole-FFN experts"):
        mope.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_two_active_adapters_each_add_their_change_to_the_frozen_mlp():
    model = ffn_model()
    model.add_adapter("second", mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["mlp"], init_weights=False))
    model.base_model.set_adapter(["default", "second"])
    layer = ffn_layers(model)[0]
    assert layer.active_adapters == ["default", "second"]
    x = torch.randn(2, 8, 64)
    frozen = layer.base_layer(x)
    want = frozen.clone()
    for name in ("default", "second"):
        gate = layer.gate_weights(name, layer.mope_router[name](x, layer.routing_inputs(x)).weights)
        want += reference_ffn(layer, x, gate, name) - frozen
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_unload_gives_the_blocks_back_and_merges_the_other_adapters():
    # PEFT's module swap copied a Linear's weight onto the block: unload raised half-way through the model
    base = make_model("llama")
    batch = make_batch("llama")
    with torch.no_grad():
        want = base(**batch).logits
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "mlp"], init_weights=False)
    unloaded = get_peft_model(base, config).unload()
    assert not any(isinstance(m, mope.MoPELayer) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batch).logits, want, rtol=0, atol=0)
    model = ffn_model()
    model.add_adapter("b", mope.MoPEConfig(num_experts=1, top_k=1, target_modules=["q_proj"], init_weights=False))
    model.base_model.set_adapter("b")
    with torch.no_grad():
        want = model(**batch).logits
    merged = model.merge_and_unload(adapter_names=["b"])
    assert not any(isinstance(m, mope.MoPELayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (None, ["mlp", "down_proj"], r"matches both 'model\.layers\.0\.mlp' and 'model\.layers\.0\.mlp\.down_proj'"),
        (["mlp"], ["down_proj", "q_proj"], r"reaches model\.layers\.0\.mlp\.down_proj, which is inside the whole-FFN"),
        (["mlp"], "all-linear", r"'all-linear' cannot reach the projections inside the whole-FFN layers"),
    ],
)
def test_targets_inside_a_whole_ffn_layer_are_refused_with_nothing_changed(first, second, message):
    # 'all-linear' gave a later adapter whole-FFN experts; a projection inside the block was "not found" or
    # failed half-way with an AttributeError
    base = make_model("llama")
    model = base if first is None else get_peft_model(base, mope.MoPEConfig(target_modules=first))
    before = {name: type(m) for name, m in model.named_modules()}
    config = mope.MoPEConfig(target_modules=second)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config) if first is None else model.add_adapter("second", config)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert first is None or list(model.peft_config) == ["default"]


def test_a_block_whose_forward_computes_more_than_the_gated_mlp_is_refused():
    # the names alone matched Falcon-H1's MLP (which scales) and Gemma 3n's (activation sparsity): the experts
    # recomputed down(act(gate(x)) * up(x)) and the model changed at init_weights=True
    from transformers.models.llama.modeling_llama import LlamaMLP

    class ScaledMLP(LlamaMLP):
        def forward(self, x):
            return 0.5 * super().forward(x)

    base = make_model("llama")
    for layer in base.model.layers:
        scaled = ScaledMLP(base.config)
        scaled.load_state_dict(layer.mlp.state_dict())
        layer.mlp = scaled
    before = {name: type(m) for name, m in base.named_modules()}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp' \(ScaledMLP\) .* computes more than"):
        get_peft_model(base, mope.MoPEConfig(target_modules=["mlp"]))
    assert {name: type(m) for name, m in base.named_modules()} == before
