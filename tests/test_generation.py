"""``generate`` with a KV cache gives, token for token, what it gives without one, for every causal-safe gate.

Cached decoding runs the routers on the newest token only; uncached decoding re-runs them on the
whole sequence at every step. Greedy outputs agree only if a token's routing reads no later
token and no other sequence of the batch: token-level gates decide per new token, sequence and
task decisions are the prompt's (``mope.routing.levels.DecisionCache``), and expert capacity is
off in a causal model outside training (``mope.routing.capacity``). Gates that look at later
tokens are refused with a clear error instead.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import MODELS, assert_cache_agrees, greedy, make_model, prompts
from peft import get_peft_model

import mope
from mope.routing import NoncausalRoutingError

# (config kwargs) of every gate and option that must decode the same with and without a KV cache
ROWS: dict[str, dict] = {
    "top_k": {},
    "top_k_unnormalised": {"top_k_order": "softmax_then_topk_unnormalised"},
    "top_k_noisy": {"router_noise": True},
    "dense": {"router": "dense"},
    "switch": {"router": "switch"},
    "top_k_capacity_sequence": {"capacity_factor": 0.5},
    "top_k_capacity_bpr": {"capacity_factor": 0.5, "capacity_policy": "bpr"},
    "top_k_capacity_random_second": {"capacity_factor": 0.5, "capacity_policy": "random_second"},
    "balanced": {"router": "balanced"},
    "top_p": {"router": "top_p", "top_p": 0.6, "top_k": 3},
    "hierarchical": {"router": "hierarchical", "num_groups": 2, "top_k": 1},
    "dselect_k": {"router": "dselect_k"},
    "cosine": {"router": "cosine"},
    "hash": {"router": "hash", "aux_loss_coef": 0.0, "z_loss_coef": 0.0},
    "soft_merge": {"router": "soft_merge", "routing_level": "sequence"},
    "soft_merge_delta": {"router": "soft_merge", "routing_level": "sequence", "soft_merge_lora": "delta"},
    "soft_merge_ia3_token": {"router": "soft_merge", "expert_type": "ia3"},
    "sequence_level": {"routing_level": "sequence"},
    "temperature": {"router_temperature": 0.5},
    "schedule": {"router_schedule_steps": 10, "router_schedule_start_top_k": 4},
    "router_blocks": {"target_modules": ["gate_proj", "up_proj", "down_proj"], "router_blocks": ["mlp"]},
    "shared_experts": {"num_shared_experts": 1},
    "adapter": {"expert_type": "adapter"},
    "adapter_series": {"expert_type": "adapter", "adapter_placement": "series"},
    "ia3": {"expert_type": "ia3", "feedforward_modules": ["down_proj"]},
    "lora_shared_a": {"expert_type": "lora_shared_a"},
}


def generation_model(model_name: str = "llama", **kwargs) -> torch.nn.Module:
    """A wrapped tiny model whose experts change its outputs and whose routers make sharp, varied choices."""
    base = {"target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4, "init_weights": False}
    config = mope.MoPEConfig(task_type=MODELS[model_name][1], **{**base, **kwargs})
    model = get_peft_model(make_model(model_name), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mope_router" in name:
                param.normal_(0, 1.0)
            elif "mope_experts" in name:
                param.mul_(4.0)  # experts strong enough that a different choice changes the next token
    return model.eval()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("row", list(ROWS))
def test_generate_with_kv_cache_equals_without(row, padded):
    model = generation_model(**ROWS[row])
    assert_cache_agrees(model, prompts(padded))


def test_adapter_changes_the_generation():
    """The control: the rows above would pass trivially if the experts did not change the tokens."""
    batch = prompts(padded=True)
    model = generation_model()
    with model.disable_adapter():
        plain = greedy(model, batch, True)
    assert not torch.equal(greedy(model, batch, True), plain)


def test_task_level_generation_with_kv_cache():
    model = generation_model(routing_level="task", num_tasks=3)
    batch = {**prompts(padded=True), "mope_task_ids": torch.tensor([2, 0])}
    assert_cache_agrees(model, batch)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_gpt2_conv1d_generation_with_kv_cache(padded):
    model = generation_model("gpt2", capacity_factor=0.5)
    assert_cache_agrees(model, prompts(padded))


@pytest.mark.parametrize("row", ["top_k", "sequence_level", "hash"])
def test_beam_search_with_kv_cache(row):
    """Beams expand the batch: sequence decisions are repeated per beam, token ids follow the reordered beams."""
    model, batch = generation_model(**ROWS[row]), prompts(padded=True)
    beams = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
    cached, uncached = (model.generate(**batch, **beams, use_cache=use_cache) for use_cache in (True, False))
    assert cached.shape == (4, 12) and torch.equal(cached, uncached)


T5_ROWS = {name: ROWS[name] for name in ("top_k", "switch", "hash", "sequence_level")}


@pytest.mark.parametrize("row", list(T5_ROWS))
def test_t5_generation_with_kv_cache(row):
    """Encoder-decoder: the decoder's cross-attention k/v layers route encoder tokens (hash: by the prompt's ids)."""
    assert_cache_agrees(generation_model("t5", **T5_ROWS[row]), prompts(padded=True))


def test_expert_choice_generation_is_refused_clearly():
    model = generation_model(router="expert_choice")
    for use_cache in (True, False):
        with pytest.raises(NoncausalRoutingError, match=r"expert_choice.*allow_noncausal_routing=True"):
            greedy(model, prompts(padded=True), use_cache)


def test_soft_tokens_is_refused_for_a_causal_model():
    with pytest.raises(ValueError, match="soft_tokens"):
        generation_model(router="soft_tokens")


@pytest.mark.parametrize("row", ["switch", "top_k_capacity_sequence", "balanced", "top_k_noisy"])
def test_generate_in_training_mode_routes_as_in_inference(row):
    # TRL's GRPO generates with the model in training mode: capacity, noise and balancing then read the batch's
    # later tokens (or random draws), and cached and uncached generation gave different tokens
    model = generation_model(**ROWS[row]).train()
    batch = prompts(padded=True)
    with torch.no_grad():
        cached, uncached = (greedy(model, batch, use_cache) for use_cache in (True, False))
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy(model.eval(), batch, True))
    model.train()
    greedy(model, batch, True)
    assert all(module.training for module in model.modules())  # the routers are back in training mode


def test_generate_takes_one_task_id_per_prompt():
    model = generation_model(routing_level="task", num_tasks=3)
    batch = prompts(padded=True)  # two prompts
    out = model.generate(**batch, mope_task_ids=torch.tensor([0, 2]), num_beams=2, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2
    # ids that only divide the expanded batch (4 beams) were taken as one per beam, or repeated over the prompts
    for ids in ([0, 1, 2, 0], [1]):
        with pytest.raises(ValueError, match=rf"mope_task_ids has {len(ids)} entries but the batch has 2"):
            model.generate(**batch, mope_task_ids=torch.tensor(ids), num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"mope_task_ids must be a 1-D integer tensor .*got a list"):
        model.generate(**batch, mope_task_ids=[0, 1], max_new_tokens=2)


def test_sequence_level_generate_from_a_prefilled_cache_is_refused():
    # the prompt's decision would pool only the tokens the cache does not hold
    model = generation_model(routing_level="sequence")
    ids = prompts(padded=False)["input_ids"]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :3], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past_key_values cache that already holds tokens"):
        model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    token_level = generation_model()
    with torch.no_grad():
        cache = token_level(input_ids=ids[:, :3], use_cache=True).past_key_values
    want = token_level.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert torch.equal(
        token_level.generate(input_ids=ids, past_key_values=cache, max_new_tokens=2, do_sample=False), want
    )


@pytest.mark.parametrize("row", ["sequence_level", "soft_merge"])
def test_a_static_cache_decides_on_the_prompt_without_its_padding(row):
    # the prompt's forward gets a 4-D mask there: the prompt's decision pooled its left padding (0.78 off)
    model = generation_model(**ROWS[row])
    batch = prompts(padded=True)
    alone = greedy(model, {k: v[1:, 3:] for k, v in batch.items()}, True)[0, 4:]
    static = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(static, greedy(model, batch, True))
    assert torch.equal(static[1, 7:], alone)
    # no mask given: generate infers it from pad_token_id, and that one is the prompt's (it pooled the padding)
    inferred = model.generate(
        input_ids=batch["input_ids"], max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static"
    )
    assert torch.equal(inferred, static)
    assert "prepare_inputs_for_generation" not in vars(model.get_base_model())  # set for that generate only
    # the wrapper keeps the signature transformers reads: prompts as embeddings alone were refused
    embeds = model.get_input_embeddings()(batch["input_ids"][:, 3:])
    assert model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 2)


@pytest.mark.parametrize(
    "option", [{"prompt_lookup_num_tokens": 2}, {"prefill_chunk_size": 4}, {"assistant_model": "any"}]
)
def test_sequence_level_generate_refuses_options_that_split_the_prompt(option):
    # the first forward was the prompt with draft tokens, or its first chunk, and its decision was pinned
    model = generation_model(routing_level="sequence")
    batch = {k: v[:1] for k, v in prompts(padded=False).items()}
    with pytest.raises(ValueError, match=rf"generate's {next(iter(option))} makes the first forward"):
        model.generate(**batch, max_new_tokens=2, do_sample=False, **option)
    lookup = generation_model()  # token-level routing: prompt lookup decoding is lossless
    want = greedy(lookup, batch, True)
    assert torch.equal(lookup.generate(**batch, **{"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
                                                   "prompt_lookup_num_tokens": 2}), want)  # fmt: skip


def test_generate_drops_nothing_where_capacity_applies_in_eval():
    # a config without task_type keeps capacity in eval; inside generate it dropped tokens: cached != uncached
    config = mope.MoPEConfig(
        target_modules="all-linear", num_experts=4, top_k=2, r=4, init_weights=False, capacity_factor=0.5
    )
    with pytest.warns(UserWarning, match="has no task_type, and PEFT's PeftModel.generate then calls the base"):
        model = get_peft_model(make_model("llama"), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 1.0) if "mope_router" in name else param.mul_(4.0) if "mope_experts" in name else None
    model.eval()
    tuner = model.base_model  # PEFT's plain PeftModel.generate skips the tuner's: its own generate is mope's
    batch = prompts(padded=True)
    cached = tuner.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, tuner.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                              use_cache=False))  # fmt: skip


def test_adapter_names_per_example_are_refused():
    # PEFT's mixed-adapter batches: every example ran through the active adapter, without a word
    model = generation_model()
    batch = prompts(padded=False)
    with pytest.raises(ValueError, match=r"adapter_names= \(an adapter per example\) is not supported"):
        model.generate(**batch, adapter_names=["default", "default"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"adapter_names="):
        model(**batch, adapter_names=["default", "default"])


def test_a_static_cache_with_a_dict_of_masks_generates_at_sequence_level():
    # Qwen2 gets its masks as a dict under a static cache: no 2-D mask was captured, and generate's position_ids of
    # a left-padded row ([0, 0, 0, 1, ...]) were refused as a packed row
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    mope_config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4, init_weights=False,
        routing_level="sequence",
    )  # fmt: skip
    model = get_peft_model(transformers.Qwen2ForCausalLM(config), mope_config).eval()
    batch = prompts(padded=True)
    static = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(static, model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_an_lm_head_under_logits_to_keep_reads_its_tokens_mask_and_ids():
    # TRL's GRPO keeps a completion's logits: the adapted lm_head's k tokens are the mask's and ids' last k columns
    model = generation_model(router="hash", top_k=1, target_modules=["q_proj", "lm_head"])
    batch = prompts(padded=True)
    with torch.no_grad():
        kept = model(**batch, logits_to_keep=3).logits
        full = model(**batch).logits
    torch.testing.assert_close(kept, full[:, -3:], rtol=1e-5, atol=1e-5)


def test_a_cache_of_another_kind_counts_as_holding_no_tokens():
    # paged attention's cache (TRL GRPO's use_transformers_paged) has neither get_seq_length nor len(): every
    # forward raised TypeError in mope's hook, which TRL reported as "list index out of range"
    from mope.routing.context import holds_tokens

    class PagedCache:
        pass

    assert holds_tokens(PagedCache()) is False
    assert holds_tokens(((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),)) is True
