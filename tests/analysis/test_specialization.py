"""mope.analysis.token_specialization (OpenMoE): how far a layer's top-1 choice is predictable from the token id alone."""

from __future__ import annotations

import math

import torch
from conftest import repeated_token_batches, routed_llama

from mope.analysis import token_specialization


def test_hash_routing_is_fully_token_id_predictable():
    model = routed_llama(router="hash", num_experts=4, aux_loss_coef=0.0, z_loss_coef=0.0)
    report = token_specialization(model, repeated_token_batches())
    assert len(report) == 4
    for layer in report.values():
        assert layer["token_id_predictability"] == 1.0
        assert layer["majority_baseline"] < 1.0
        assert layer["repeated_tokens"] == 3 * (4 * 16 - 5)
        assert layer["distinct_ids"] == 6


def test_learned_router_is_token_determined_only_before_attention_mixes_context():
    model = routed_llama(num_experts=4, top_k=1, router_init_std=1.0)
    report = token_specialization(model, repeated_token_batches())
    # layer 0's q_proj sees normed embeddings: its input, hence its choice, is a function of the token id
    assert report["base_model.model.model.layers.0.self_attn.q_proj"]["token_id_predictability"] == 1.0
    later = report["base_model.model.model.layers.1.self_attn.q_proj"]
    assert later["majority_baseline"] <= later["token_id_predictability"] < 1.0


def test_specialization_skips_layers_without_token_ids():
    model = routed_llama(num_experts=4, top_k=1)
    batch = repeated_token_batches(1)[0]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    assert token_specialization(model, [{"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}]) == {}


def test_a_nan_router_reports_nan_predictability():
    model = routed_llama(num_experts=4, top_k=1)
    poisoned = "base_model.model.model.layers.1.mlp.up_proj"
    with torch.no_grad():
        dict(model.named_modules())[poisoned].mope_router["default"].weight.fill_(float("nan"))
    report = token_specialization(model, repeated_token_batches())
    nan = report.pop(poisoned)
    # before: every token "chose" expert 0, a perfect predictability of 1.0
    assert math.isnan(nan["token_id_predictability"]) and math.isnan(nan["majority_baseline"])
    assert nan["nonfinite_tokens"] == 3 * (4 * 16 - 5)
    assert all(layer["nonfinite_tokens"] == 0 and layer["token_id_predictability"] <= 1 for layer in report.values())
