"""The Arrow gate (mope.routing.arrow) on experts from PEFT LoRAs: prototypes, save/load, cached generation, and
PEFT's own Arrow as the reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_TARGETS, make_batch, make_model, train_lora
from peft import PeftModel

import mope
from mope.layer import MoPELayer
from mope.reuse import init_arrow
from mope.routing.arrow import ArrowRouter, top_right_singular_vectors


def mope_layers(model) -> list[MoPELayer]:
    return [m for m in model.modules() if isinstance(m, MoPELayer)]


def test_arrow_prototype_is_the_top_singular_vector_of_each_update(llama_adapters):
    model = mope.from_lora_adapters(make_model("llama"), llama_adapters)  # default: arrow
    layer = mope_layers(model)[0]
    bank, router = layer.mope_experts["default"], layer.mope_router["default"]
    assert isinstance(router, ArrowRouter) and not list(router.parameters())
    for e in range(3):
        delta = bank.lora_B[e].T.double() @ bank.lora_A[e].double()
        top = torch.linalg.svd(delta).Vh[0].float()
        assert abs(torch.dot(router.weight[e], top)) == pytest.approx(1.0, abs=1e-5)
    # an input along expert 1's prototype routes there
    x = 5 * router.weight[1] + 0.01 * torch.randn(router.weight.shape[1])
    assert router(x[None, None]).weights[0, 0].argmax() == 1


def test_prototypes_of_a_zero_update_are_zero():
    a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    b[1] = 0
    prototypes = top_right_singular_vectors(a, b)
    assert prototypes[0].norm() == pytest.approx(1.0) and prototypes[1].abs().sum() == 0


def test_arrow_mixture_runs_untrained_and_round_trips(llama_adapters, tmp_path):
    base = make_model("llama")
    batch = make_batch("llama", pad=2)
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = mope.from_lora_adapters(base, llama_adapters[:2], mope.MoPEConfig(router="arrow", top_k=1))
    assert not any(p.requires_grad for p in model.parameters())  # frozen experts, parameterless router
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["router"] == "arrow" and saved["freeze_experts"] is True
    again = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, rtol=0, atol=0)
    assert init_arrow(again) == len(mope_layers(again))  # recomputing gives the saved prototypes
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, rtol=0, atol=1e-6)


def test_arrow_needs_lora_experts():
    with pytest.raises(ValueError, match="expert_type"):
        mope.MoPEConfig(router="arrow", expert_type="adapter")
    with pytest.raises(ValueError, match="routing_level"):
        mope.MoPEConfig(router="arrow", routing_level="task", num_tasks=2)


def test_arrow_generation_with_kv_cache_equals_without(llama_adapters):
    from test_generation import assert_cache_agrees, prompts

    model = mope.from_lora_adapters(make_model("llama"), llama_adapters, mope.MoPEConfig(router="arrow", top_k=2))
    with torch.no_grad():
        for layer in mope_layers(model):
            layer.mope_experts["default"].lora_B.mul_(50.0)  # strong enough that routing changes the tokens
    init_arrow(model)
    assert_cache_agrees(model.eval(), prompts(padded=True))


def test_arrow_equals_peft_arrow_given_the_same_prototypes(llama_adapters, tmp_path):
    """PEFT's own Arrow (lora/arrow.py) is the reference for scores, top-k and mixing. Its prototypes come
    from 15 power iterations, which miss the top singular vector when s2/s1 is near 1 (it is, for LoRAs
    trained a few steps), so both use mope's exact ones here."""
    from peft import ArrowConfig, create_arrow_model

    other = train_lora("llama", tmp_path / "r4b", seed=6, r=4, lora_alpha=4, target_modules=LLAMA_TARGETS)
    paths = [llama_adapters[2], other]  # PEFT's Arrow needs equal ranks
    batch = make_batch("llama", pad=2)
    for k in (1, 2):
        ours = mope.from_lora_adapters(make_model("llama"), paths, mope.MoPEConfig(router="arrow", top_k=k))
        ref = create_arrow_model(make_model("llama"), [str(p) for p in paths], ArrowConfig(top_k=k, rng_seed=0))
        with torch.no_grad():
            ref(**batch)  # PEFT builds its prototypes on the first forward
            modules = dict(ref.base_model.model.named_modules())
            for layer in mope_layers(ours):
                (arrow,) = [m for m in modules[layer.module_name].modules() if hasattr(m, "prototypes")]
                arrow.prototypes.copy_(layer.mope_router["default"].weight)
            torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=0, atol=1e-5)


def test_prototypes_stay_float32_on_a_half_precision_base():
    # PEFT upcast the experts (parameters) to float32 but left the prototypes (a buffer) in the base's bf16: init_arrow
    # rounded them, and tokens went to other experts than on a float32 base
    from peft import get_peft_model

    config = mope.MoPEConfig(target_modules=["q_proj"], num_experts=4, top_k=1, router="arrow")
    model = get_peft_model(make_model("llama").to(torch.bfloat16), config)
    model.add_adapter("second", config)
    for layer in mope_layers(model):
        assert {layer.mope_router[name].weight.dtype for name in ("default", "second")} == {torch.float32}
    kept = get_peft_model(make_model("llama").to(torch.bfloat16), config, autocast_adapter_dtype=False)
    assert mope_layers(kept)[0].mope_router["default"].weight.dtype == torch.bfloat16  # as PEFT's parameters there
