"""mope.analysis.token_choices: each token's top-1 expert per adapted layer, on the host."""

from __future__ import annotations

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
