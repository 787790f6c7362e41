"""mope.analysis.token_choices: each token's top-1 expert per adapted layer, on the host."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import repeated_token_batches, routed_llama

from mope.analysis import token_choices


def test_token_choices_give_one_top1_expert_per_token_and_layer():
    model = routed_llama(num_experts=3, top_k=1)
    batch = repeated_token_batches(1)[0]
    choices = token_choices(model, batch)
    assert len(choices) == 4
    for top1 in choices.values():
        assert top1.shape == (4, 16) and top1.device.type == "cpu"
        assert int(top1.max()) < 3


def test_token_choices_refuse_a_nan_router_and_leave_no_hook():
    model = routed_llama(num_experts=3, top_k=1)
    poisoned = "base_model.model.model.layers.1.mlp.up_proj"
    router = dict(model.named_modules())[poisoned].mope_router["default"]
    with torch.no_grad():
        router.weight.fill_(float("nan"))
    # before: expert 0 for every token (argmax of a NaN row), as if it were a choice
    with pytest.raises(ValueError, match=rf"NaN/inf for this batch in {re.escape(poisoned)}: the top-1 expert"):
        token_choices(model, repeated_token_batches(1)[0])
    assert not router._forward_hooks
