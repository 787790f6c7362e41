"""OpenMoE routing analyses: token-id specialisation, stability between checkpoints, load by position."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model
from peft import get_peft_model

import mope
from mope.analysis import routing_agreement, routing_report, token_choices, token_specialization


def wrapped(targets=("q_proj", "up_proj"), seed: int = 0, **kwargs):
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=list(targets), r=2, **kwargs)
    torch.manual_seed(seed)
    return get_peft_model(make_model("llama"), config).eval()


def repeated_token_batches(count: int = 3, seq: int = 16) -> list[dict]:
    """Few distinct ids (1..6) in random contexts, so every id recurs in many contexts."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 7, (4, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_hash_routing_is_fully_token_id_predictable():
    model = wrapped(router="hash", num_experts=4, aux_loss_coef=0.0, z_loss_coef=0.0)
    report = token_specialization(model, repeated_token_batches())
    assert len(report) == 4
    for layer in report.values():
        assert layer["token_id_predictability"] == 1.0
        assert layer["majority_baseline"] < 1.0
        assert layer["repeated_tokens"] == 3 * (4 * 16 - 5)
        assert layer["distinct_ids"] == 6


def test_learned_router_is_token_determined_only_before_attention_mixes_context():
    model = wrapped(num_experts=4, top_k=1, router_init_std=1.0)
    report = token_specialization(model, repeated_token_batches())
    # layer 0's q_proj sees normed embeddings: its input, hence its choice, is a function of the token id
    assert report["base_model.model.model.layers.0.self_attn.q_proj"]["token_id_predictability"] == 1.0
    later = report["base_model.model.model.layers.1.self_attn.q_proj"]
    assert later["majority_baseline"] <= later["token_id_predictability"] < 1.0


def test_specialization_skips_layers_without_token_ids():
    model = wrapped(num_experts=4, top_k=1)
    batch = repeated_token_batches(1)[0]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    assert token_specialization(model, [{"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}]) == {}


def test_identical_checkpoints_agree_fully_and_a_new_router_does_not():
    model = wrapped(num_experts=4, top_k=2, router_init_std=1.0)
    batches = repeated_token_batches()
    same = routing_agreement(model, copy.deepcopy(model), batches)
    assert len(same) == 4
    for layer in same.values():
        assert layer["top1_agreement"] == layer["topk_agreement"] == 1.0
        assert layer["tokens"] == 3 * (4 * 16 - 5)
    other = copy.deepcopy(model)
    torch.manual_seed(7)
    for module in other.modules():
        if isinstance(module, mope.MoPELayer):
            torch.nn.init.normal_(module.mope_router["default"].weight, std=1.0)
    changed = routing_agreement(model, other, batches)
    for layer in changed.values():  # 4 experts: an unrelated router agrees about as often as chance
        assert layer["top1_agreement"] < 0.5 and layer["topk_agreement"] < 0.5


def test_agreement_refuses_models_adapted_in_different_modules():
    with pytest.raises(ValueError, match="different modules"):
        routing_agreement(wrapped(["q_proj"]), wrapped(["up_proj"]), repeated_token_batches(1))


def test_report_has_load_by_position_and_specialization_in_one_pass():
    model = wrapped(num_experts=4, top_k=2)
    report = routing_report(model, iter(repeated_token_batches()))
    for layer in report.values():
        assert len(layer["load_by_position"]) == 16
        assert all(sum(row) == pytest.approx(1.0) for row in layer["load_by_position"])
        assert {"load_cv", "entropy", "drop_rate", "token_id_predictability"} <= set(layer)


def test_token_choices_give_one_top1_expert_per_token_and_layer():
    model = wrapped(num_experts=3, top_k=1)
    batch = repeated_token_batches(1)[0]
    choices = token_choices(model, batch)
    assert len(choices) == 4
    for top1 in choices.values():
        assert top1.shape == (4, 16) and top1.device.type == "cpu"
        assert int(top1.max()) < 3


def test_plots_render_to_png(tmp_path):
    from mope.analysis.plots import load_heatmap, routing_by_position, token_map

    model = wrapped(num_experts=4, top_k=2)
    batches = repeated_token_batches(1)
    report = routing_report(model, batches)
    heat = load_heatmap(report)
    assert heat.axes[0].images[0].get_array().shape == (4, 4)
    position = routing_by_position(report)
    assert len(position.axes) == 2
    assert "no drops recorded" in position.axes[0].texts[0].get_text()  # no capacity set
    choices = {name: top1[1] for name, top1 in token_choices(model, batches[0]).items()}
    tokens = [str(i) for i in batches[0]["input_ids"][1].tolist()]
    mapped = token_map(tokens, choices, num_experts=4)
    assert mapped.axes[0].images[0].get_array().shape == (4, 16)
    for i, fig in enumerate((heat, position, mapped)):
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").read_bytes()[:4] == b"\x89PNG"
