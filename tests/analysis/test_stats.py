"""mope.routing_stats: load, entropy and drop rate by position, collected only while asked."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, make_model, repeated_token_batches, routed_llama
from peft import get_peft_model

import mope
from mope.layer import MoPELayer


def wrapped(**kwargs):
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"], r=2, **kwargs)
    return get_peft_model(make_model("llama"), config).eval()


def test_load_shares_entropy_and_tokens_exclude_padding():
    model = wrapped(num_experts=4, top_k=2)
    batch = make_batch("llama", batch=2, seq=8, pad=3)
    batch.pop("labels")
    with mope.routing_stats(model) as stats:
        model(**batch)
    report = stats.report()
    assert len(report) == sum(isinstance(m, MoPELayer) for m in model.modules()) == 4
    for layer in report.values():
        assert layer["tokens"] == 2 * 8 - 3
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert 0 < layer["entropy"] <= math.log(4) + 1e-6
        assert layer["drop_rate"] == 0.0 and layer["drop_rate_by_position"] == []
    # hooks are gone after the block: a later forward changes nothing
    model(**batch)
    assert stats.report() == report


def test_the_weight_share_leaves_padding_out_even_when_it_is_nan():
    # weights * mask: a padding row's NaN (fully masked fp16 attention) made every share NaN, and the export refused it
    model = wrapped(num_experts=4, top_k=2)
    batch = make_batch("llama", batch=2, seq=8, pad=3)
    batch.pop("labels")
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    pad = batch["attention_mask"] == 0
    hook = layer.register_forward_pre_hook(lambda m, args: (args[0].masked_fill(pad.unsqueeze(-1), float("nan")),))
    with mope.routing_stats(model) as stats:
        model(**batch)
    hook.remove()
    entry = stats.report()[layer_name(model, layer)]
    assert entry["nonfinite_tokens"] == 0 and all(math.isfinite(x) for x in [*entry["weight"], *entry["load"]])
    assert math.isfinite(entry["entropy"])
    assert sum(entry["weight"]) == pytest.approx(1.0)


def layer_name(model, layer) -> str:
    return next(name for name, m in model.named_modules() if m is layer)


def test_entropy_matches_a_hand_computation():
    model = wrapped(num_experts=3, top_k=1)
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    x = torch.randn(1, 5, layer.in_features)
    with mope.routing_stats(model) as stats:
        layer(x)
    probs = torch.softmax(x @ layer.mope_router["default"].weight.T, -1)
    want = -(probs * probs.log()).sum(-1).mean().item()
    name = next(n for n, m in model.named_modules() if m is layer)
    assert stats.report()[name]["entropy"] == pytest.approx(want, rel=1e-5)


def test_drop_rate_by_position_with_capacity():
    model = wrapped(num_experts=4, top_k=2, capacity_factor=0.5, capacity_policy="sequence")
    model.train()  # a causal model drops only in training (mope.routing.top_k.TopKRouter.capacity_applies)
    batch = make_batch("llama", batch=4, seq=12)
    batch.pop("labels")
    with mope.routing_stats(model) as stats:
        model(**batch)
    for layer in stats.report().values():
        by_position = layer["drop_rate_by_position"]
        assert len(by_position) == 12
        assert 0 < layer["drop_rate"] < 1
        # "sequence" serves early positions first: drops land towards the end
        assert by_position[0] <= by_position[-1]
        assert sum(by_position[6:]) > sum(by_position[:6])


def test_batches_of_different_lengths_accumulate_by_position():
    model = wrapped(num_experts=4, top_k=1, capacity_factor=0.5)
    with mope.routing_stats(model) as stats:
        for seq in (6, 10):
            batch = make_batch("llama", batch=2, seq=seq)
            batch.pop("labels")
            model(**batch)
    for layer in stats.report().values():
        assert len(layer["drop_rate_by_position"]) == 10
        assert layer["tokens"] == 2 * 6 + 2 * 10


POISONED = "base_model.model.model.layers.1.mlp.up_proj"  # no adapted module downstream of it


@pytest.mark.parametrize(
    "kwargs",
    [{"top_k": 2}, {"router": "dense"}, {"top_k": 2, "capacity_factor": 0.5}],
    ids=["top_k", "dense", "capacity"],
)
def test_a_nan_router_reports_nan_not_a_plausible_load(kwargs):
    model = routed_llama(num_experts=4, **kwargs).train("capacity_factor" in kwargs)  # drops need training mode
    with torch.no_grad():
        dict(model.named_modules())[POISONED].mope_router["default"].weight.fill_(float("nan"))
    with mope.routing_stats(model) as stats:
        model(**repeated_token_batches(1)[0])
    report = stats.report()
    nan = report.pop(POISONED)
    # before: top-k of a NaN row picked the same experts for every token, a load of [0, 0, 0.5, 0.5]
    assert nan["nonfinite_tokens"] == nan["tokens"] == 4 * 16 - 5
    assert all(math.isnan(x) for x in [*nan["load"], nan["load_cv"], nan["entropy"], nan["drop_rate"]])
    assert all(math.isnan(x) for row in nan["load_by_position"] for x in row)
    assert all(math.isnan(x) for x in nan["drop_rate_by_position"])
    for layer in report.values():
        assert layer["nonfinite_tokens"] == 0 and sum(layer["load"]) == pytest.approx(1.0)


def test_a_model_under_routing_hooks_still_pickles():
    # the hooks were closures: torch.save(model) from a Trainer callback (log_routing's hooks on) failed
    import pickle

    model = get_peft_model(make_model("llama"), mope.MoPEConfig(target_modules=["q_proj"], init_weights=False))
    with mope.routing_stats(model) as stats:
        model(**make_batch("llama"))
        again = pickle.loads(pickle.dumps(model))
        assert stats.report()
    assert again is not model
