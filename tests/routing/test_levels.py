"""Routing levels (mope.routing.levels): sequence pooling (padding, KV cache, generate) and task-level routing, with
task ids reaching the routers through every PEFT task class.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import make_batch, make_model, prompts
from peft import PeftModel, get_peft_model

import mope
from mope.layer import MoPELayer
from mope.routing import ROUTERS, RoutingInputs


def sharpen_routers(model, std: float = 1.0) -> None:
    """Router weights large enough that decisions differ between tokens and sequences."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mope_router" in name:
                p.normal_(0, std)


@pytest.mark.parametrize(
    ("router", "options"),
    [("expert_choice", {"capacity_factor": 1.0}), ("top_k", {"capacity_factor": 1.0}), ("balanced", {})],
)
@pytest.mark.parametrize("level", ["sequence", "task"])
def test_an_example_of_padding_only_takes_no_capacity_from_the_others(router, options, level):
    # an all-padding example was one of T candidates: it took slots, and the real examples' routing changed
    tasks = {"num_tasks": 5} if level == "task" else {}
    config = mope.MoPEConfig(num_experts=4, top_k=1, router=router, routing_level=level, **tasks, **options)
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        gate = ROUTERS[router](16 if level == "sequence" else 5, 4, 1, config)
        torch.nn.init.normal_(gate.weight, std=1.0)
        x, mask, ids = torch.randn(5, 4, 16), torch.ones(5, 4, dtype=torch.long), torch.arange(5)
        alone = gate(x[:4], RoutingInputs(token_mask=mask[:4], task_ids=ids[:4]))
        mask[4] = 0
        padded = gate(x, RoutingInputs(token_mask=mask, task_ids=ids))
        changed += not torch.equal(alone.weights, padded.weights[:4])
    assert changed == 0


@pytest.mark.parametrize("router", ["top_k", "dense", "top_p", "cosine"])
def test_sequence_level_is_the_gate_of_the_masked_mean(router):
    config = mope.MoPEConfig(num_experts=4, top_k=2, router=router, routing_level="sequence")
    torch.manual_seed(0)
    gate = ROUTERS[router](16, 4, 2, config)
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    routing = gate(x, RoutingInputs(token_mask=mask))
    for b in range(3):
        pooled = sum(x[b, t] for t in range(5) if mask[b, t]) / mask[b].sum()
        want = gate.decide(pooled.unsqueeze(0), RoutingInputs()).weights[0]
        for t in range(5):
            torch.testing.assert_close(routing.weights[b, t], want)
    poisoned = x.clone()
    poisoned[mask == 0] = 1e4
    torch.testing.assert_close(gate(poisoned, RoutingInputs(token_mask=mask)).weights, routing.weights)


def test_sequence_level_ignores_padding_in_bert():
    config = mope.MoPEConfig(
        task_type="SEQ_CLS", target_modules="all-linear", num_experts=4, router="top_k", routing_level="sequence"
    )
    model = get_peft_model(make_model("bert"), config)
    sharpen_routers(model)
    model.eval()
    batch = make_batch("bert", seq=6)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(2, 3, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(2, 3, dtype=torch.long)], dim=1),
    }
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(model(**padded).logits, want, rtol=1e-5, atol=1e-5)
        unmasked = model(input_ids=padded["input_ids"], attention_mask=torch.ones_like(padded["input_ids"])).logits
    assert not torch.allclose(unmasked, want, atol=1e-4)


def sequence_llama():
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        num_experts=4,
        top_k=1,
        r=8,
        routing_level="sequence",
        init_weights=False,
    )
    model = get_peft_model(make_model("llama"), config)
    sharpen_routers(model)
    return model.eval()


def count_decisions(model) -> list[int]:
    calls = [0]
    for module in model.modules():
        if isinstance(module, MoPELayer):
            router = module.mope_router["default"]
            original = router.decide

            def decide(x, inputs, original=original):
                calls[0] += 1
                return original(x, inputs)

            router.decide = decide
    return calls


def test_sequence_level_generate_decides_on_the_prompt_with_and_without_cache():
    model = sequence_llama()
    layers = sum(isinstance(m, MoPELayer) for m in model.modules())
    prompt = make_batch("llama", pad=2)
    prompt.pop("labels")
    calls = count_decisions(model)
    outputs = {}
    for use_cache in (True, False):
        calls[0] = 0
        outputs[use_cache] = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache)
        assert calls[0] == layers  # one decision per router, on the prompt, reused for every new token
    assert outputs[True].shape[1] == prompt["input_ids"].shape[1] + 5
    assert torch.equal(outputs[True], outputs[False])
    # the control: the bare model's generate re-pools prompt + new tokens at every uncached step
    unpinned = model.base_model.model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert not torch.equal(unpinned, outputs[True])


def test_kv_cache_step_reuses_the_prompt_decision_outside_generate():
    model = sequence_llama()
    prompt = make_batch("llama")
    with torch.no_grad():
        first = model(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], use_cache=True)
        next_ids = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(next_ids)], dim=1)
        calls = count_decisions(model)
        step = model(input_ids=next_ids, attention_mask=mask, cache=first.past_key_values)
        assert calls[0] == 0 and torch.isfinite(step.logits).all()
        model.base_model.routing_context.decisions.clear()
        with pytest.raises(RuntimeError, match="KV-cached"):
            model(input_ids=next_ids, attention_mask=mask, cache=first.past_key_values)


def task_model(name: str, router: str = "top_k", num_tasks: int = 3):
    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}[name]
    config = mope.MoPEConfig(
        task_type=task,
        target_modules="all-linear",
        num_experts=4,
        top_k=1,
        r=4,
        router=router,
        routing_level="task",
        num_tasks=num_tasks,
        init_weights=False,
    )
    model = get_peft_model(make_model(name), config)
    sharpen_routers(model, std=3.0)
    return model


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_task_ids_reach_the_routers_through_peft_forward(name):
    model = task_model(name)
    model.train()
    seen: list[dict] = []
    model.base_model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    batch = make_batch(name, batch=3)
    out = model(**batch, mope_task_ids=torch.tensor([0, 2, 2]), group_ids=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert "mope_task_ids" not in seen[-1] and "group_ids" not in seen[-1]  # consumed by mope's pre-hook
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    router = layer.mope_router["default"]
    assert router.weight.shape == (4, 3)  # a per-task logit table
    assert router.weight.grad[:, 1].abs().sum() == 0 and router.weight.grad[:, 2].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        a = model(**batch, mope_task_ids=torch.tensor([0, 0, 0])).logits
        b = model(**batch, mope_task_ids=torch.tensor([1, 1, 1])).logits
        with pytest.raises(ValueError, match="task_ids"):
            model(**batch)
        with pytest.raises(ValueError, match="num_tasks"):
            model(**batch, mope_task_ids=torch.tensor([0, 3, 0]))
        with pytest.raises(ValueError, match="task_ids"):
            model(**batch, mope_task_ids=torch.tensor([[0, 1, 2]]))
    assert not torch.allclose(a, b)


def test_task_level_weights_are_the_gate_of_the_task_column():
    model = task_model("llama", router="dense")
    captured = []
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    layer.mope_router["default"].register_forward_hook(lambda m, a, out: captured.append(out))
    batch = make_batch("llama", batch=2)
    with torch.no_grad():
        model(**batch, mope_task_ids=torch.tensor([2, 0]))
    table = layer.mope_router["default"].weight
    for b, task in enumerate([2, 0]):
        want = torch.softmax(table[:, task], dim=0)
        torch.testing.assert_close(captured[0].weights[b], want.expand(8, 4))


def test_task_level_generate_keeps_task_ids_for_every_step():
    model = task_model("llama").eval()
    prompt = make_batch("llama")
    prompt.pop("labels")
    out = {}
    for use_cache in (True, False):
        out[use_cache] = model.generate(
            **prompt, mope_task_ids=torch.tensor([1, 2]), max_new_tokens=4, do_sample=False, use_cache=use_cache
        )
    assert torch.equal(out[True], out[False])
    with pytest.raises(ValueError, match="task_ids"):
        model.generate(**prompt, max_new_tokens=2, do_sample=False)


TASK_CLASS_MODELS = {
    "TOKEN_CLS": transformers.BertForTokenClassification,
    "QUESTION_ANS": transformers.BertForQuestionAnswering,
}


@pytest.mark.parametrize("task_type", sorted(TASK_CLASS_MODELS))
def test_mope_task_ids_pass_through_every_peft_task_class(task_type):
    """PEFT's task classes claim ``task_ids`` and drop it; ``mope_task_ids`` reaches the routers through each."""
    torch.manual_seed(0)
    bert_config = make_model("bert").config
    bert_config.num_labels = 2  # question answering: start and end logits
    base = TASK_CLASS_MODELS[task_type](bert_config).eval()
    config = mope.MoPEConfig(
        task_type=task_type, target_modules=["query", "value"], num_experts=4, top_k=1,
        routing_level="task", num_tasks=3, init_weights=False,
    )  # fmt: skip
    model = get_peft_model(base, config)
    sharpen_routers(model, std=3.0)
    batch = {k: v for k, v in make_batch("bert", batch=3).items() if k != "labels"}
    with torch.no_grad():
        a = model(**batch, mope_task_ids=torch.tensor([0, 0, 0]))
        b = model(**batch, mope_task_ids=torch.tensor([1, 1, 1]))
        assert not torch.allclose(a[0], b[0])
        with pytest.raises(ValueError, match="mope_task_ids"):  # PEFT dropped task_ids: the error names the way
            model(**batch, task_ids=torch.tensor([0, 0, 0]))


def test_task_ids_still_reach_the_routers_where_peft_passes_them_on():
    model = task_model("llama")
    plain = PeftModel(make_model("llama"), model.peft_config["default"])  # no task type: every kwarg passes on
    plain.load_state_dict(model.state_dict())
    batch = make_batch("llama", batch=2)
    with torch.no_grad():
        want = model(**batch, mope_task_ids=torch.tensor([2, 1])).logits
        torch.testing.assert_close(plain(**batch, task_ids=torch.tensor([2, 1])).logits, want)


def test_a_training_forward_keeps_no_sequence_decision():
    # kept decisions serve decoding steps; a training forward's broke torch.compile's backward (TypeError)
    model = sequence_llama()
    batch = make_batch("llama")
    model.train()
    model(**batch).loss.backward()
    assert model.base_model.routing_context.decisions.decisions == {}
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert len(model.base_model.routing_context.decisions.decisions) > 0


def test_task_ids_must_be_one_per_example_outside_generate():
    # [0, 2] for a batch of 4 acted as [0, 0, 2, 2]; int16 ids crashed in scatter
    model = task_model("llama").eval()
    batch = {k: v for k, v in make_batch("llama", batch=4).items() if k != "labels"}
    with pytest.raises(ValueError, match="task_ids has 2 entries but the batch has 4"):
        model(**batch, mope_task_ids=torch.tensor([0, 2]))
    ids = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        want = model(**batch, mope_task_ids=ids).logits
        torch.testing.assert_close(model(**batch, mope_task_ids=ids.to(torch.int16)).logits, want, rtol=0, atol=0)


def test_task_ids_that_no_active_adapter_reads_are_warned_about_once():
    # a token-level mixture took them out of the call and routed as if they were not there, without a word
    model = mope.get_mope_model(make_model("llama"), mope.MoPEConfig(target_modules=["q_proj"], num_experts=2)).eval()
    batch = {k: v for k, v in make_batch("llama").items() if k != "labels"}
    with pytest.warns(UserWarning, match=r"no active MoPE adapter routes by task \(routing_level \['token'\]\)"):
        model(**batch, mope_task_ids=torch.tensor([0, 1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**batch, mope_task_ids=torch.tensor([0, 1]))  # once
        task_model("llama").eval()(**batch, mope_task_ids=torch.tensor([0, 1]))  # read: no warning
    assert not [w for w in caught if "mope_task_ids" in str(w.message)]


def test_task_ids_that_are_not_tensors_or_do_not_fit_the_prompts_are_refused():
    # a list was taken out of the call unread: under fix_task every example then got the fixed task; prompts given as
    # inputs_embeds to generate took any count of ids that divided them ([0, 1] for 4 prompts acted as [0, 0, 1, 1])
    model = task_model("llama").eval()
    batch = {k: v for k, v in make_batch("llama", batch=3).items() if k != "labels"}
    with mope.fix_task(model, 0):
        for call in (model, lambda **kw: model.generate(**kw, max_new_tokens=1)):
            with pytest.raises(ValueError, match=r"mope_task_ids must be a 1-D integer tensor .*got a list"):
                call(**batch, mope_task_ids=[0, 1, 2])
    embeds = model.get_input_embeddings()(torch.randint(3, 128, (4, 5)))
    with pytest.raises(ValueError, match="mope_task_ids has 2 entries but the batch has 4"):
        model.generate(inputs_embeds=embeds, mope_task_ids=torch.tensor([0, 1]), max_new_tokens=1)


def test_task_ids_of_multiple_choice_are_per_question():
    # the layers see [batch * choices] rows: ids of [batch] were refused ("2 entries but the batch has 6")
    base = transformers.BertForMultipleChoice(make_model("bert").config)
    config = mope.MoPEConfig(
        target_modules=["query", "value"], num_experts=4, top_k=1, routing_level="task", num_tasks=3, init_weights=False
    )
    model = get_peft_model(base, config).eval()
    sharpen_routers(model, std=3.0)
    ids = torch.randint(3, 128, (2, 3, 6), generator=torch.Generator().manual_seed(5))
    tasks = torch.tensor([0, 2])
    with torch.no_grad():
        want = model(input_ids=ids, mope_task_ids=tasks.repeat_interleave(3)).logits
        torch.testing.assert_close(model(input_ids=ids, mope_task_ids=tasks).logits, want, rtol=0, atol=0)
        per_choice = model(input_ids=ids, mope_task_ids=tasks[:, None].expand(2, 3)).logits
        torch.testing.assert_close(per_choice, want, rtol=0, atol=0)
        assert not torch.allclose(model(input_ids=ids, mope_task_ids=tasks.flip(0)).logits, want)


def test_hash_routing_in_a_t5_generate_with_beams():
    # the encoder's token ids reached the expanded cross-attention states unexpanded: 'no token ids matching'
    config = mope.MoPEConfig(task_type="SEQ_2_SEQ_LM", target_modules="all-linear", num_experts=4, router="hash")
    model = get_peft_model(make_model("t5"), config).eval()
    prompt = {k: v for k, v in make_batch("t5").items() if k != "labels"}
    beams = model.generate(**prompt, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("level", ["sequence", "task"])
def test_checkpointing_recomputes_with_the_routing_inputs_of_its_own_forward(level, compiled):
    # a forward on another batch before backward (a reference or metrics pass) replaced the routing call, and the
    # recomputation routed with its mask / task ids: gradients up to 16x off (compiled: 1.6x, until the call was
    # put back by the checkpointed function itself rather than by a context dynamo does not take)
    def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
        extra = {"num_tasks": 3} if level == "task" else {}
        config = mope.MoPEConfig(
            task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], num_experts=4, top_k=2, r=4,
            routing_level=level, init_weights=False, **extra,
        )  # fmt: skip
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), config)
        sharpen_routers(model)
        if checkpointed:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch._dynamo.reset()
        run = torch.compile(model, backend="aot_eager") if compiled and checkpointed else model
        first, other = make_batch("llama", pad=3), make_batch("llama", seed=5, pad=1)
        tasks = [{"mope_task_ids": torch.tensor(t)} if level == "task" else {} for t in ([0, 1], [2, 2])]
        loss = run(**first, **tasks[0]).loss
        with torch.no_grad():
            run(**{k: v for k, v in other.items() if k != "labels"}, **tasks[1])
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_layer_seeing_fewer_tokens_than_the_mask_without_a_kv_cache_routes_what_it_sees():
    # logits_to_keep (generate's prefill, TRL's GRPO): lm_head sees the last token, the mask covers all; this was
    # taken for a KV-cache step, reusing another batch's decision (or refusing a left-padded generate)
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"], num_experts=4, top_k=1, r=4,
        routing_level="sequence", init_weights=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config)
    sharpen_routers(model, std=3.0)
    model.eval()
    first, second = (make_batch("llama", seed=s, pad=2) for s in (1, 7))
    second.pop("labels")
    with torch.no_grad():
        want = model(**second, logits_to_keep=1).logits
        model(**{k: v for k, v in first.items() if k != "labels"})
        torch.testing.assert_close(model(**second, logits_to_keep=1).logits, want, rtol=0, atol=0)
    out = model.generate(**second, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == second["input_ids"].shape[1] + 2


def qwen2_moe(level: str, **options):
    """A tiny Qwen2-MoE whose shared expert (which sees the tokens flattened, ``[batch * seq, hidden]``) is adapted."""
    config = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        shared_expert_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.Qwen2MoeForCausalLM(config).eval()
    mope_config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["shared_expert.up_proj"], num_experts=4, top_k=1, r=4,
        routing_level=level, init_weights=False, **options,
    )  # fmt: skip
    model = get_peft_model(base, mope_config)
    sharpen_routers(model, std=3.0)
    return model.eval()


def test_sequence_level_on_flattened_tokens_pools_each_sequence_without_its_padding():
    # Qwen2-MoE's shared expert sees [batch * seq, hidden]: it was routed token by token, padding included
    model = qwen2_moe("sequence")
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, MoPELayer):
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
            module.mope_router["default"].register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name + ".routing", out)
            )
    batch = make_batch("llama", seq=6, pad=2)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"]
    layers = [name for name in seen if not name.endswith(".routing")]
    assert len(layers) == 2
    for name in layers:
        x, weights = seen[name], seen[name + ".routing"].weights
        assert x.shape[:-1] == (mask.numel(),) and weights.shape[:-1] == mask.shape
        gate = model.get_submodule(name).mope_router["default"]
        tokens = x.view(*mask.shape, -1)
        for b in range(mask.shape[0]):
            pooled = tokens[b][mask[b].bool()].mean(dim=0, keepdim=True)
            want = gate.decide(pooled, RoutingInputs()).weights[0]
            for t in range(mask.shape[1]):
                torch.testing.assert_close(weights[b, t], want)
    calls = count_decisions(model)
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    outputs = {}
    for use_cache in (True, False):
        calls[0] = 0
        outputs[use_cache] = model.generate(**prompt, max_new_tokens=4, do_sample=False, use_cache=use_cache)
        assert calls[0] == 2  # one decision per router on the prompt, reused for every new token
    assert torch.equal(outputs[True], outputs[False])
    # a static cache gives the prompt's forward a 4-D mask: its flattened tokens were routed one by one, padding too
    for beams in (1, 2):
        options = {"max_new_tokens": 4, "do_sample": False, "num_beams": beams, "pad_token_id": 0}
        static = model.generate(**prompt, **options, cache_implementation="static")
        assert torch.equal(static, model.generate(**prompt, **options))


def test_hash_routing_on_flattened_tokens_decodes_with_a_cache():
    # a cached step's shared expert sees [batch, hidden], one new token per example: it got no token ids (an error)
    model = qwen2_moe("token", router="hash", aux_loss_coef=0.0, z_loss_coef=0.0)
    prompt = prompts(padded=True)
    for beams in (1, 2):
        options = {"max_new_tokens": 4, "do_sample": False, "num_beams": beams, "pad_token_id": 0}
        want = model.generate(**prompt, **options, use_cache=False)
        assert torch.equal(model.generate(**prompt, **options), want)
        assert torch.equal(model.generate(**prompt, **options, cache_implementation="static"), want)


def test_a_cached_step_without_a_mask_reuses_the_prompt_s_decision_but_an_encoder_does_not():
    # a hand-written loop without masks: a decoder-only model's step routed its new token alone (0.387 off); an
    # encoder called directly after a cached decoder step (it reads that step's call) must not reuse a decision
    model = get_peft_model(make_model("llama"), mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=1, r=4, init_weights=False,
        routing_level="sequence",
    )).eval()  # fmt: skip
    sharpen_routers(model, std=3.0)
    ids, new = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[94]])
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones(1, 6, dtype=torch.long), use_cache=True)
        ones = torch.ones(1, 7, dtype=torch.long)
        want = model(input_ids=new, attention_mask=ones, past_key_values=masked.past_key_values).logits
        cache = model(input_ids=ids, use_cache=True).past_key_values
        torch.testing.assert_close(model(input_ids=new, past_key_values=cache).logits, want, rtol=0, atol=0)
    t5 = get_peft_model(make_model("t5"), mope.MoPEConfig(
        task_type="SEQ_2_SEQ_LM", target_modules=["q", "v", "wo"], num_experts=4, top_k=1, r=4, init_weights=False,
        routing_level="sequence",
    )).eval()  # fmt: skip
    sharpen_routers(t5, std=3.0)
    first, second = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(5)).unbind(0)
    with torch.no_grad():
        start = torch.zeros(1, 1, dtype=torch.long)
        want = t5(input_ids=second[None], decoder_input_ids=start).encoder_last_hidden_state
        encoded = t5.get_encoder()(input_ids=first[None])
        out = t5(encoder_outputs=encoded, decoder_input_ids=start, use_cache=True)
        t5(encoder_outputs=encoded, decoder_input_ids=start, past_key_values=out.past_key_values, use_cache=True)
        got = t5.get_encoder()(input_ids=second[None]).last_hidden_state  # after the first's cached step
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_token_level_aux_loss_on_flattened_tokens_leaves_padding_out():
    model = qwen2_moe("token", aux_loss_coef=1.0)
    model.train()
    batch = make_batch("llama", seq=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded_ids = torch.cat([ids, torch.randint(1, 128, (2, 3), generator=torch.Generator().manual_seed(9))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).aux_loss
        got = model(input_ids=padded_ids, attention_mask=padded_mask).aux_loss
        unmasked = model(input_ids=padded_ids, attention_mask=torch.ones_like(padded_mask)).aux_loss
    torch.testing.assert_close(got, want)
    assert not torch.allclose(unmasked, want)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_seq2seq_label_padding_counts_in_no_loss_or_decision(level):
    # DataCollatorForSeq2Seq pads labels with -100 and gives no decoder_attention_mask: the decoder's padding
    # positions counted in the aux loss and were pooled into the decoder's sequence-level decision
    config = mope.MoPEConfig(
        task_type="SEQ_2_SEQ_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4, init_weights=False,
        routing_level=level,
    )  # fmt: skip
    t5 = make_model("t5").config
    t5.dropout_rate = 0.0  # T5's attention drops out in training (the base model's logits would differ)
    torch.manual_seed(0)
    model = get_peft_model(transformers.T5ForConditionalGeneration(t5), config)
    sharpen_routers(model)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    short = torch.tensor([[3, 4, 5], [6, 7, 8]])
    padded = torch.cat([short, torch.full((2, 3), -100)], dim=1)
    with torch.no_grad():
        want, got = (model(input_ids=ids, labels=labels) for labels in (short, padded))
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    torch.testing.assert_close(got.loss, want.loss)
    # transformers 5.0's T5 attends over the longer padded rows with other rounding (4e-5); the padding moved them by 4.6
    torch.testing.assert_close(got.logits[:, :3], want.logits, rtol=1e-4, atol=1e-4)


def test_a_packed_row_is_refused_at_sequence_level():
    # a padding-free batch (no attention mask, position_ids restarting at 0): one decision pooled every sequence
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], routing_level="sequence")
    model = get_peft_model(make_model("llama"), config)
    ids = make_batch("llama")["input_ids"][:1]
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="a row of this batch holds several sequences"):
        model(input_ids=ids, position_ids=packed)
    model(input_ids=ids, position_ids=torch.arange(8)[None])  # one sequence per row
    token_level = get_peft_model(make_model("llama"), mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    token_level(input_ids=ids, position_ids=packed)  # per token, packing changes nothing


def test_an_example_of_padding_only_counts_nowhere_in_a_one_vector_per_example_layer():
    # BERT's pooler sees [batch, hidden]: its token mask was None, so a DDP eval's masked repeats counted in its load
    from mope.analysis import RoutingStats

    config = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["dense"], num_experts=4, top_k=1, r=2)
    model = get_peft_model(make_model("bert"), config).eval()
    sharpen_routers(model)
    ids = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[2:] = 0
    reports = []
    for batch in ({"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids, "attention_mask": mask}):
        with torch.no_grad(), RoutingStats(model) as stats:
            model(**batch)
        reports.append(next(v for k, v in stats.report().items() if "pooler" in k))
    assert reports[1]["tokens"] == reports[0]["tokens"] == 2
    assert reports[1]["load"] == reports[0]["load"]


def test_multiple_choice_padding_is_masked():
    # [batch, choices, seq] masks and ids were not 2-D: padding counted (pooled, in the losses) and hash refused
    model = transformers.BertForMultipleChoice(make_model("bert").config)
    config = mope.MoPEConfig(
        target_modules=["query", "value"], num_experts=4, top_k=2, routing_level="sequence", init_weights=False
    )
    model = get_peft_model(model, config).eval()
    sharpen_routers(model)
    ids = torch.randint(3, 128, (2, 3, 8), generator=torch.Generator().manual_seed(5))
    pad = torch.zeros(2, 3, 6, dtype=torch.long)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = model(input_ids=torch.cat([ids, pad], -1), attention_mask=torch.cat([torch.ones_like(ids), pad], -1))
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-6)


def test_hash_routing_in_a_seq2seq_decoder_trains_from_labels_alone():
    # the model shifts the labels right itself, after the pre-hook: its decoder's hash routers had no token ids
    config = mope.MoPEConfig(
        task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"], num_experts=4, top_k=1, router="hash", init_weights=False,
        aux_loss_coef=0.0, z_loss_coef=0.0,
    )  # fmt: skip
    model = get_peft_model(make_model("t5"), config).eval()  # no dropout: the two forwards compare exactly
    batch = make_batch("t5")
    labels = batch["labels"]
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    shifted = model.base_model.model.prepare_decoder_input_ids_from_labels(labels=labels)
    given = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=shifted,
                  labels=labels).loss  # fmt: skip
    torch.testing.assert_close(loss, given)
