"""The hash gate (mope.routing.hash): the expert is a fixed hash of the token id, never of the hidden state, so a model
must be given token ids (T5's decoder ids included).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model, router_of
from peft import get_peft_model

import mope
from mope.routing import RoutingInputs
from mope.routing.hash import HASH_PRIME

NO_LOSSES = {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}  # a hash gate learns nothing


def test_hash_matches_reference_and_ignores_hidden_states():
    gate = router_of("hash", num_experts=5, **NO_LOSSES)
    ids = torch.randint(0, 1000, (3, 7))
    inputs = RoutingInputs(token_ids=ids)
    routing = gate(torch.randn(3, 7, 16), inputs)
    a, b = gate.multiplier, gate.offset
    for i, t in enumerate(ids.flatten().tolist()):
        expert = ((a * t + b) % HASH_PRIME) % 5
        assert routing.weights.reshape(-1, 5)[i].tolist() == [float(e == expert) for e in range(5)]
    torch.testing.assert_close(gate(torch.randn(3, 7, 16), inputs).weights, routing.weights)
    assert router_of("hash", num_experts=5, hash_seed=1, **NO_LOSSES).multiplier != a
    with pytest.raises(ValueError, match="token id"):
        gate(torch.randn(3, 7, 16), RoutingInputs())


def test_hash_needs_token_ids_in_the_model():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, router="hash")
    model = get_peft_model(make_model("llama"), config)
    batch = make_batch("llama")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="token id"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    t5 = get_peft_model(
        make_model("t5"), mope.MoPEConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q"], num_experts=4, router="hash")
    )
    t5_batch = make_batch("t5")
    t5(**t5_batch)  # labels alone: the decoder's ids are the labels shifted right, as T5 builds them itself
    t5(**t5_batch, decoder_input_ids=torch.randint(1, 128, (2, 4)))
    embedded = t5.get_input_embeddings()(t5_batch["labels"].clamp_min(0))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        t5(input_ids=t5_batch["input_ids"], decoder_inputs_embeds=embedded)  # no ids for the decoder
