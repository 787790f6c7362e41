"""Adding an expert type: a class defined here, one registry line, and the whole library runs it.

The worked example of docs/architecture.md. ``BiasExpertBank`` lives only in this file; it is
registered with ``EXPERT_BANKS`` for the test's duration and then goes through forward, soft
merging, Soft MoE slots, the export's refusal, folding, save and reload, with no other change.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model
from torch import nn

import mope
from mope.experts import EXPERT_BANKS, ExpertBank
from mope.layer import MoPELayer


class BiasExpertBank(ExpertBank):
    """N learned output biases ``b [N, d_out]``: a token adds ``g @ b``, its gate-weighted mix."""

    soft_merge = "sequence"  # linear in the parameters: merging the biases per sequence is exact
    soft_tokens = True
    no_lora_form = "bias experts, which add a constant: there is no low-rank update of the input"

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__(in_features, out_features, config, num_experts)
        self.biases = nn.Parameter(torch.zeros(num_experts, out_features))
        if not config.init_weights:
            nn.init.normal_(self.biases, std=0.5)

    def forward(self, x, base_out, weights, chosen=None):
        return base_out + (weights.to(self.biases.dtype) @ self.biases).to(base_out.dtype)

    def soft_merged_delta(self, x, base_out, g, lora_mode):
        return (g.to(self.biases.dtype) @ self.biases)[:, None, :].expand(base_out.shape)

    def slot_deltas(self, xs, zs):
        return self.biases[None, :, None, :].expand(xs.shape[0], -1, xs.shape[2], -1)

    def fold_into(self, weight, bias, weights, sign=1):
        return weight, bias + sign * (weights.to(self.biases.dtype) @ self.biases).to(bias.dtype)


@pytest.fixture(autouse=True)
def bias_experts(monkeypatch):
    monkeypatch.setitem(EXPERT_BANKS, "bias", BiasExpertBank)  # the one registry line


def bias_config(**overrides) -> mope.MoPEConfig:
    kwargs = {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "o_proj"], "num_experts": 4, "top_k": 2}
    return mope.MoPEConfig(expert_type="bias", init_weights=False, **{**kwargs, **overrides})


def bias_layers(model) -> list[MoPELayer]:
    return [m for m in model.modules() if isinstance(m, MoPELayer)]


def test_forward_adds_the_gate_weighted_biases():
    base = make_model("llama")
    batch = make_batch("llama")
    with torch.no_grad():
        want_base = base(**batch).logits
    model = get_peft_model(base, mope.MoPEConfig(**{**vars(bias_config()), "init_weights": True}))
    with torch.no_grad():  # init_weights=True: zero biases, the base model exactly
        torch.testing.assert_close(model(**batch).logits, want_base, rtol=0, atol=0)

    model = get_peft_model(make_model("llama"), bias_config())
    layer = bias_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        weights = layer.mope_router["default"](x).weights
        want = layer.base_layer(x) + weights @ layer.mope_experts["default"].biases
        torch.testing.assert_close(layer(x), want)
        assert (weights > 0).sum(-1).eq(2).all()  # top-2 of 4 reached the bank


def test_trains_saves_and_reloads(tmp_path):
    model = get_peft_model(make_model("llama"), bias_config())
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = bias_layers(model)[0].mope_experts["default"].biases.detach().clone()
    model(**make_batch("llama")).loss.backward()
    optimizer.step()
    assert not torch.equal(bias_layers(model)[0].mope_experts["default"].biases, before)

    model.eval()
    batch = make_batch("llama", pad=2)
    with torch.no_grad():
        want = model(**batch).logits
    mope.save_pretrained(model, tmp_path / "bundle")
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle")
    assert isinstance(bias_layers(loaded)[0].mope_experts["default"], BiasExpertBank)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)


def test_soft_merge_of_a_linear_type_equals_the_mixture_of_outputs():
    config = bias_config(router="soft_merge", routing_level="sequence")
    model = get_peft_model(make_model("llama"), config)
    bank = bias_layers(model)[0].mope_experts["default"]
    x, base_out = torch.randn(3, 6, bank.in_features), torch.randn(3, 6, bank.out_features)
    per_sequence = torch.softmax(torch.randn(3, 1, bank.num_experts), -1).expand(3, 6, -1)
    torch.testing.assert_close(bank.forward_soft_merged(x, base_out, per_sequence), bank(x, base_out, per_sequence))
    with torch.no_grad():
        assert torch.isfinite(model(**make_batch("llama")).logits).all()


def test_soft_tokens_runs_the_slots_of_the_new_type():
    config = mope.MoPEConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], expert_type="bias", router="soft_tokens"
    )
    model = get_peft_model(make_model("bert"), config)
    for layer in bias_layers(model):  # nonzero biases, so the slots' outputs reach the logits
        nn.init.normal_(layer.mope_experts["default"].biases)
    with torch.no_grad():
        logits = model(**make_batch("bert")).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**make_batch("bert")).logits, logits)


def test_export_refuses_with_the_types_own_reason(tmp_path):
    model = get_peft_model(make_model("llama"), bias_config())
    with pytest.raises(ValueError, match="expert_type='bias' gives bias experts, which add a constant"):
        mope.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_fold_into_the_base_with_a_fixed_gate():
    config = bias_config(target_modules=["q_proj"], num_experts=1, top_k=1)
    base = make_model("llama")
    for name, module in base.named_modules():  # Llama's projections have no bias: give q_proj one to fold into
        if name.endswith("q_proj"):
            module.bias = nn.Parameter(torch.zeros(module.out_features))
    model = get_peft_model(base, config)
    batch = make_batch("llama")
    with torch.no_grad():
        want = model(**batch).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, want)


def test_a_type_without_fold_into_is_refused_by_name_and_nothing_changes(monkeypatch):
    # the base class raised a bare NotImplementedError('') from inside the merge
    monkeypatch.delattr(BiasExpertBank, "fold_into")
    model = get_peft_model(make_model("llama"), bias_config(target_modules=["q_proj"], num_experts=1, top_k=1))
    batch = make_batch("llama")
    with torch.no_grad():
        want = model(**batch).logits
        with pytest.raises(
            ValueError, match=r"Cannot merge .*module '.*q_proj': .*BiasExpertBank does not implement fold_into"
        ):
            model.merge_and_unload()
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)
    assert not any(layer.merged_adapters for layer in bias_layers(model))
