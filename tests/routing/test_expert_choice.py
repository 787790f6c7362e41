"""Expert choice (mope.routing.expert_choice): each expert picks its tokens, checked against a reference loop; the
gate refuses causal inference unless allowed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, make_model, make_router, padded_mask, skewed_logits
from peft import get_peft_model

import mope
from mope.losses import load_balancing_loss
from mope.routing import NoncausalRoutingError, RoutingInputs


def reference_expert_choice(logits, mask, factor):
    flat = logits.reshape(-1, logits.shape[-1]).tolist()
    real = mask.reshape(-1).tolist()
    n = len(flat[0])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in flat]
    tokens = [t for t in range(len(flat)) if real[t]]
    c = min(math.ceil(factor * len(tokens) / n), len(tokens))
    out = [[0.0] * n for _ in flat]
    for e in range(n):
        for t in sorted(tokens, key=lambda t: (-probs[t][e], t))[:c]:
            out[t][e] = probs[t][e]
    return torch.tensor(out), c


@pytest.mark.parametrize("factor", [None, 0.5, 1.0, 3.0, 10.0])
def test_expert_choice_matches_reference(factor):
    logits, mask = skewed_logits(3, 7, 4, seed=7), padded_mask(3, 7)
    router = make_router("expert_choice", 4, 2, capacity_factor=factor)
    router.train()
    routing = router.gate(logits, RoutingInputs(token_mask=mask))
    want, c = reference_expert_choice(logits, mask, factor or 2.0)  # None -> top_k
    torch.testing.assert_close(routing.weights.reshape(-1, 4), want, rtol=1e-5, atol=1e-7)
    assert ((routing.weights > 0).sum(dim=(0, 1)) == c).all()  # every expert takes exactly c tokens
    # load: the dispatch counts, scaled to a mean of 1 per real token (the loss's f_i is each expert's share)
    counts = (routing.weights > 0).reshape(-1, 4).sum(0).float()
    real = mask.sum().float()
    torch.testing.assert_close(routing.load.reshape(-1, 4).sum(0), counts * real / counts.sum())


def test_the_load_balancing_loss_of_a_balanced_expert_choice_is_one():
    # tokens no expert took had all-zero load rows, which scaled the loss down by their share (0.25 here, not 1)
    router = make_router("expert_choice", 4, 1, capacity_factor=1.0).train()
    logits = torch.zeros(1, 8, 4)  # uniform: every expert takes the first 2 tokens, the other 6 get none
    routing = router.gate(logits, RoutingInputs())
    assert ((routing.weights > 0).sum(dim=(0, 1)) == 2).all() and (routing.weights[0, 2:] == 0).all()
    assert load_balancing_loss(routing, None).item() == pytest.approx(1.0)


def sparse_config(model: str, **kwargs) -> mope.MoPEConfig:
    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    base = {"target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4}
    return mope.MoPEConfig(task_type=task, **{**base, **kwargs})


def test_expert_choice_refuses_inference_in_causal_lm():
    batch = make_batch("llama")
    model = get_peft_model(make_model("llama"), sparse_config("llama", router="expert_choice"))
    model.train()
    model(**batch).loss.backward()  # training is allowed (the caveat is documented)
    model.eval()
    with pytest.raises(NoncausalRoutingError, match="allow_noncausal_routing"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(NoncausalRoutingError, match=r"MoPEConfig\.allow_noncausal_routing=True"), torch.no_grad():
        model(**batch)
    allowed = get_peft_model(
        make_model("llama"), sparse_config("llama", router="expert_choice", allow_noncausal_routing=True)
    )
    allowed.eval()
    out = allowed.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    assert out.shape == (2, 10)
    encoder = get_peft_model(make_model("bert"), sparse_config("bert", router="expert_choice"))
    encoder.eval()
    with torch.no_grad():
        encoder(**make_batch("bert"))  # an encoder is not causal: no refusal


def test_expert_choice_refuses_a_kv_cache_step_in_any_model():
    router = make_router("expert_choice")  # no task_type: not known to be causal
    router.train()
    logits = torch.randn(2, 1, 4)
    with pytest.raises(NoncausalRoutingError, match="allow_noncausal_routing"):
        router.gate(logits, RoutingInputs(cache_step=True))
    allowed = make_router("expert_choice", allow_noncausal_routing=True)
    assert allowed.gate(logits, RoutingInputs(cache_step=True)).weights.shape == (2, 1, 4)
