"""MoPEModel (mope.tuner): which modules get experts, refusals that leave the model exactly as it was, the aux loss
its forward hook adds, one routing context per model, and merging.
"""

from __future__ import annotations

import typing

import pytest
import torch
from conftest import Snapshot, assert_plain, bundle_config, make_batch, make_model, no_grad_logits, tiny_mixtral
from peft import get_peft_model
from torch.utils import _pytree as pytree
from transformers.utils import ModelOutput

import mope
from mope import MoPEConfig, MoPELayer, outputs
from mope.losses import load_balancing_loss, router_z_loss

BAD_TARGETS = [
    ("matches-nothing", ["nonexistent_proj"], ["nonexistent_proj", "not found"]),
    ("unsupported-type", ["embed_tokens"], ["model.embed_tokens", "Embedding", "Linear"]),
    # model.norm comes after every q_proj: this fails once four layers were already wrapped
    ("unsupported-after-wrapping", ["q_proj", "norm"], ["model.norm", "LlamaRMSNorm"]),
]


@pytest.mark.parametrize(
    ("target_modules", "substrings"), [row[1:] for row in BAD_TARGETS], ids=[row[0] for row in BAD_TARGETS]
)
def test_bad_targets_leave_model_unchanged(target_modules: list[str], substrings: list[str]) -> None:
    model = make_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # restoring must not just unfreeze everything
    batch = make_batch("llama")
    before = Snapshot.of(model, batch)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=target_modules, num_experts=2, top_k=1, r=2)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    for substring in substrings:
        assert substring in str(info.value), f"{substring!r} not in: {info.value}"
    before.assert_same(model, batch)
    assert_plain(model)


@pytest.mark.parametrize(
    ("target_modules", "substrings"), [row[1:] for row in BAD_TARGETS], ids=[row[0] for row in BAD_TARGETS]
)
def test_bad_targets_for_second_adapter(target_modules: list[str], substrings: list[str]) -> None:
    peft_model = get_peft_model(make_model("llama"), bundle_config())
    batch = make_batch("llama")
    before = Snapshot.of(peft_model, batch)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=target_modules, num_experts=2, top_k=1, r=2)
    with pytest.raises(ValueError) as info:
        peft_model.add_adapter("second", config)
    for substring in substrings:
        assert substring in str(info.value), f"{substring!r} not in: {info.value}"
    before.assert_same(peft_model, batch)
    assert all("second" not in layer.mope_experts for layer in peft_model.modules() if isinstance(layer, MoPELayer))


def test_per_module_patterns_set_expert_counts():
    config = mope.MoPEConfig(
        target_modules="all-linear",
        num_experts=2,
        top_k=1,
        r=2,
        num_experts_pattern={r"layers\.1\..*": 6},
        top_k_pattern={r"layers\.1\..*": 3},
    )
    model = get_peft_model(make_model("llama"), config)
    for name, m in model.named_modules():
        if isinstance(m, MoPELayer):
            want = (6, 3) if ".layers.1." in name else (2, 1)
            s = m.mope_settings["default"]
            assert (s.num_experts, s.top_k) == want, name
            assert m.mope_experts["default"].lora_A.shape[0] == want[0]


def test_mixed_placement_single_expert_on_attention():
    config = mope.MoPEConfig(
        target_modules="all-linear",
        num_experts=4,
        top_k=2,
        r=2,
        num_experts_pattern={"self_attn\\..*": 1},
        top_k_pattern={"self_attn\\..*": 1},
    )
    model = get_peft_model(make_model("llama"), config)
    attn = model.base_model.model.model.layers[0].self_attn.q_proj
    assert attn.mope_settings["default"].num_experts == 1
    assert attn.fold_blocker("default") is None  # a plain LoRA: mergeable
    assert model.base_model.model.model.layers[0].mlp.up_proj.mope_settings["default"].num_experts == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts_pattern": {"no_such_module": 2}}, "num_experts_pattern"),
        ({"top_k_pattern": {"mlp\\..*": 5}}, "top_k"),
        ({"expert_type": "ia3", "feedforward_modules": ["no_such_proj"]}, "feedforward_modules"),
        ({"router_blocks": ["no_such_block"]}, "router_blocks"),
    ],
)
def test_invalid_placement_is_refused_and_model_untouched(kwargs, field):
    base = make_model("llama")
    before = {n: type(m) for n, m in base.named_modules()}
    config = mope.MoPEConfig(target_modules="all-linear", num_experts=4, top_k=1, r=2, **kwargs)
    with pytest.raises(ValueError, match=field):
        get_peft_model(base, config)
    assert {n: type(m) for n, m in base.named_modules()} == before


def test_aux_loss_unchanged_by_padding_tokens():
    """Right-padding a causal batch leaves real tokens' states alone, so aux_loss must not move."""
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4)
    model = get_peft_model(make_model("llama"), config)
    model.train()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    short = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded = model(input_ids=padded_ids, attention_mask=padded_mask)
    unmasked = model(input_ids=padded_ids, attention_mask=torch.ones_like(padded_ids))
    torch.testing.assert_close(padded.aux_loss, short.aux_loss, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(unmasked.aux_loss, short.aux_loss, rtol=1e-5, atol=1e-7)


def test_aux_loss_is_mean_over_layers_weighted_by_coefficients():
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        num_experts=4,
        top_k=2,
        r=4,
        aux_loss_coef=0.5,
        z_loss_coef=0.25,
    )
    model = get_peft_model(make_model("llama"), config)
    model.train()
    seen = []
    ctx = model.base_model.routing_context
    original = ctx.record

    def spy(record):
        seen.append(record)
        original(record)

    ctx.record = spy
    out = model(**make_batch("llama", pad=2))
    layers = sum(isinstance(m, MoPELayer) for m in model.modules())
    # the reference: each layer's loss on its own (the tuner batches them over layers)
    lb = torch.stack([load_balancing_loss(r.routing, r.mask) for r in seen if r.loss_name == "load_balancing"])
    z = torch.stack([router_z_loss(r.routing, r.mask) for r in seen if r.loss_name == "z_loss"])
    assert len(lb) == len(z) == layers
    torch.testing.assert_close(out.aux_loss, 0.5 * lb.mean() + 0.25 * z.mean())
    # the gradient reaches each layer's logits alike (the batched losses take the softmax of all layers at once)
    tensors = [r.routing.logits for r in seen if r.loss_name == "load_balancing"]
    grads = torch.autograd.grad(out.aux_loss, tensors, retain_graph=True)
    expected = torch.autograd.grad(0.5 * lb.mean() + 0.25 * z.mean(), tensors)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    # both losses read the layers' logits stacked once (mope.routing.base.stack_tokens): one gradient each, no adds
    assert graph_nodes(out.aux_loss.grad_fn).count("StackBackward0") == 1


def graph_nodes(root) -> list[str]:
    """The names of the autograd nodes ``root`` reaches, each once."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return [type(node).__name__ for node in seen]


def test_no_aux_loss_in_eval_mode():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4)
    model = get_peft_model(make_model("llama"), config)
    model.eval()
    out = model(**make_batch("llama"))
    assert out.get("aux_loss") is None


def test_return_dict_false_with_labels_adds_the_aux_loss_to_the_loss():
    # Before: the tuple's loss left the router losses out (4.894 instead of 4.906 here).
    model = get_peft_model(make_model("llama"), bundle_config()).train()
    batch = make_batch("llama")
    as_dict = model(**batch)
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_dict.aux_loss > 0
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)


def test_return_dict_false_without_labels_in_training_is_refused():
    # Before: the tuple came back and the router losses were silently lost.
    model = get_peft_model(make_model("llama"), bundle_config()).train()
    inputs = {k: v for k, v in make_batch("llama").items() if k != "labels"}
    with pytest.raises(ValueError) as info:
        model(**inputs, return_dict=False)
    message = str(info.value)
    assert message.startswith("LlamaForCausalLM returned a tuple without a loss (return_dict=False and no labels)")
    assert "Call it with return_dict=True and add output.aux_loss to your loss, or pass labels" in message
    model.eval()  # no router loss outside training: the tuple is returned as it is
    torch.testing.assert_close(model(**inputs, return_dict=False)[0], model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "made"),
    [("llama", "when injected"), ("bert", "when injected"), ("bert", "on the first forward"), ("mixtral", "never")],
)
def test_a_training_output_is_rebuilt_from_its_items_as_ddp_does(name, made, monkeypatch):
    # Before: DDP looking for unused parameters (Trainer's choice for a PeftModel) rebuilds the output as
    # type(**items) and failed: "SequenceClassifierOutput.__init__() got an unexpected keyword argument 'aux_loss'".
    base = tiny_mixtral() if name == "mixtral" else make_model(name)
    declared = typing.get_args(typing.get_type_hints(type(base).forward)["return"]) or (
        typing.get_type_hints(type(base).forward)["return"],
    )
    declared = next(t for t in declared if isinstance(t, type) and issubclass(t, ModelOutput))
    task = "SEQ_CLS" if name == "bert" else "CAUSAL_LM"
    config = MoPEConfig(task_type=task, target_modules=["query", "q_proj"], num_experts=4, top_k=2, r=2)
    model = get_peft_model(base, config).train()
    if made == "on the first forward":
        monkeypatch.setattr(outputs, "WITH_AUX_LOSS", {})
    out = model(**make_batch("bert" if name == "bert" else "llama"))
    assert isinstance(out, declared) and out.aux_loss > 0
    assert (type(out) is declared) == (made == "never")  # Mixtral's output has an aux_loss field of its own
    leaves, spec = pytree.tree_flatten(out)
    again = pytree.tree_unflatten(leaves, spec)
    assert type(again) is type(out) and list(again.keys()) == list(out.keys())
    assert again.aux_loss is out.aux_loss and again.loss is out.loss and again.logits is out.logits


def test_a_second_adapter_shares_the_routing_context():
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=2)
    model = get_peft_model(make_model("llama"), config)
    model.add_adapter("other", mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["v_proj"], num_experts=2))
    contexts = {id(m.routing_context) for m in model.modules() if isinstance(m, MoPELayer)}
    assert contexts == {id(model.base_model.routing_context)}
    assert len(model.base_model.hook_handles) == 2


@pytest.mark.parametrize("mope_first", [True, False], ids=["lora_on_mope", "mope_on_lora"])
def test_a_lora_stacked_on_the_same_model_runs_beside_the_mixture(mope_first) -> None:
    # PEFT shares one config table between the two tuners: mope's hook read routing_level off the LoraConfig
    import peft
    from packaging.version import Version
    from peft import LoraConfig

    if mope_first and Version(peft.__version__) < Version("0.21"):
        pytest.skip("PEFT < 0.21's LoRA tuner calls model.forward, which skips mope's hooks (docs/bundles.md)")

    mixture = MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, top_k=2, init_weights=False)
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=["k_proj"], init_lora_weights=False)
    batch = make_batch("llama")
    first, second = (mixture, lora) if mope_first else (lora, mixture)
    inner = get_peft_model(make_model("llama"), first)
    alone = no_grad_logits(inner, batch)
    outer = get_peft_model(inner.get_base_model(), second, adapter_name="second")
    assert not torch.allclose(no_grad_logits(outer, batch), alone)  # the second adapter adds its change
    assert outer.train()(**batch).aux_loss is not None


def test_a_tuner_pickled_before_its_newer_flags_existed_runs() -> None:
    # torch.save of a whole model from an older mope: its tuner lacks the attributes set since in __init__
    model = get_peft_model(make_model("llama"), bundle_config(num_experts=2, top_k=1))
    for name in ("meta_experts", "adapters_enabled"):
        del vars(model.base_model)[name]
    assert model.train()(**make_batch("llama")).aux_loss is not None


def test_add_weighted_adapter_is_refused_by_name() -> None:
    model = get_peft_model(make_model("llama"), MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match=r"add_weighted_adapter .* does not apply to MoPE adapters"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    assert list(model.peft_config) == ["default"]


def test_merge_of_input_routed_experts_refused() -> None:
    peft_model = get_peft_model(make_model("llama"), bundle_config())
    batch = make_batch("llama")
    before = Snapshot.of(peft_model, batch)
    with pytest.raises(ValueError) as info:
        peft_model.merge_and_unload()
    message = str(info.value)
    assert "routes by input" in message and "nothing was changed" in message
    assert "q_proj" in message or "_proj" in message
    before.assert_same(peft_model, batch)
    with pytest.raises(ValueError, match="routes by input"):
        peft_model.merge_adapter()
    before.assert_same(peft_model, batch)


def test_merge_of_single_expert_is_exact() -> None:
    peft_model = get_peft_model(make_model("llama"), bundle_config(num_experts=1, top_k=1))
    batch = make_batch("llama")
    expected = no_grad_logits(peft_model, batch)
    base_logits = no_grad_logits(make_model("llama"), batch)
    assert not torch.allclose(expected, base_logits, atol=1e-4), "init_weights=False should change the model"
    merged = peft_model.merge_and_unload()
    assert_plain(merged)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in merged.modules())
    torch.testing.assert_close(no_grad_logits(merged, batch), expected, rtol=0, atol=1e-5)


def test_a_safe_merge_that_overflows_in_a_later_layer_changes_nothing() -> None:
    # PEFT merges (and unloads) layer by layer: the earlier layers were merged and unwrapped before the refusal
    peft_model = get_peft_model(make_model("llama"), bundle_config(num_experts=1, top_k=1, target_modules=["q_proj"]))
    last = [m for m in peft_model.modules() if isinstance(m, MoPELayer)][-1]
    with torch.no_grad():
        last.mope_experts["default"].lora_A.fill_(1e30)
        last.mope_experts["default"].lora_B.fill_(1e30)
    modules = [(name, type(m)) for name, m in peft_model.named_modules()]
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    for merge in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(
            ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj' gives non-finite weights; nothing"
        ):
            merge(safe_merge=True)
        assert [(name, type(m)) for name, m in peft_model.named_modules()] == modules
        assert all(torch.equal(v, state[k]) for k, v in peft_model.state_dict().items())
        assert not any(m.merged for m in peft_model.modules() if isinstance(m, MoPELayer))


def test_unmerge_after_the_model_moved_and_a_failed_unmerge_leaves_the_adapter_merged(monkeypatch) -> None:
    # the gate a merge kept did not move with the model (unmerge failed on another device), and it was forgotten
    # before the failing unfold, so the layer read "unmerged" while its weight still held the fold
    model = get_peft_model(make_model("llama"), bundle_config(num_experts=1, top_k=1, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.merge_adapter()
    folded = layer.base_layer.weight.detach().clone()
    bank = layer.mope_experts["default"]
    monkeypatch.setattr(type(bank), "fold_into", lambda *args: (_ for _ in ()).throw(RuntimeError("unfold failed")))
    with pytest.raises(RuntimeError, match="unfold failed"):
        model.unmerge_adapter()
    assert layer.merged_adapters == ["default"] and "default" in layer.merged_gates
    assert torch.equal(layer.base_layer.weight, folded)
    monkeypatch.undo()
    model.to("meta")  # another device (the only other one without a GPU)
    model.unmerge_adapter()
    assert layer.merged_adapters == [] and layer.merged_gates == {} and layer.base_layer.weight.device.type == "meta"


def two_mergeable_adapters():
    """'lora' (LoRA experts) and 'scale' ((IA)^3 experts scaling down_proj's input), one expert each, both active."""
    common = dict(task_type="CAUSAL_LM", target_modules=["down_proj"], num_experts=1, top_k=1, r=4, init_weights=False)
    model = get_peft_model(make_model("llama"), MoPEConfig(expert_type="lora", **common), adapter_name="lora")
    model.add_adapter("scale", MoPEConfig(expert_type="ia3", feedforward_modules=["down_proj"], **common))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mope_experts" in name:
                param.normal_(1.0 if "ia3" in name else 0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("order", [["lora", "scale"], ["scale", "lora"]])
def test_merging_lora_and_input_scaling_ia3_adapters_folds_what_the_forward_computes(order):
    # the forward is W (x * l) + dW x; folding 'lora' first gave (W + dW) diag(l): logits 0.31 off
    model = two_mergeable_adapters()
    model.base_model.set_adapter(order)
    batch = make_batch("llama")
    weights = [
        layer.get_base_layer().weight.detach().clone() for layer in model.modules() if isinstance(layer, MoPELayer)
    ]
    unmerged = no_grad_logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(no_grad_logits(model, batch), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for layer, weight in zip([m for m in model.modules() if isinstance(m, MoPELayer)], weights, strict=True):
        torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0, atol=1e-6)


def lora_and_output_scaling_ia3():
    """'lora' then 'scale' ((IA)^3 scaling down_proj's output, so (W + dW) * l in the forward), both active."""
    common = dict(task_type="CAUSAL_LM", target_modules=["down_proj"], num_experts=1, top_k=1, r=4, init_weights=False)
    model = get_peft_model(make_model("llama"), MoPEConfig(expert_type="lora", **common), adapter_name="lora")
    model.add_adapter("scale", MoPEConfig(expert_type="ia3", **common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(3))
    model.base_model.set_adapter(["lora", "scale"])
    return model.eval()


@pytest.mark.parametrize("make", [lora_and_output_scaling_ia3, two_mergeable_adapters])
def test_merging_adapters_one_call_at_a_time_folds_in_the_forward_s_order_or_refuses(make):
    # each call folds into what the base holds: the (IA)^3 before the LoRA gave W * l + dW for the forward's
    # (W + dW) * l (0.057 off), and the LoRA before an input scaling (W + dW) diag(l) (0.048 off); named in one call
    # against the active order too
    model = make()
    if make is two_mergeable_adapters:
        model.base_model.set_adapter(["lora", "scale"])
    batch = make_batch("llama")
    unmerged = no_grad_logits(model, batch)
    model.merge_adapter(adapter_names=["scale", "lora"])
    torch.testing.assert_close(no_grad_logits(model, batch), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    first, then = ("scale", "lora") if make is lora_and_output_scaling_ia3 else ("lora", "scale")
    model.merge_adapter(adapter_names=[first])
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=r"applies them in the order .* nothing was changed"):
        model.merge_adapter(adapter_names=[then])
    before.assert_same(model, batch)
    model.unmerge_adapter()
    model.merge_adapter(adapter_names=[then])  # the forward's first, then the other: exact
    model.merge_adapter(adapter_names=[first])
    torch.testing.assert_close(no_grad_logits(model, batch), unmerged, rtol=0, atol=1e-5)


def test_folds_that_commute_merge_one_call_at_a_time_in_any_order():
    # two scalings, or two LoRAs, commute: merging them against the active order was refused (exact before)
    common = dict(task_type="CAUSAL_LM", target_modules=["down_proj"], num_experts=1, top_k=1, r=4, init_weights=False)
    model = get_peft_model(make_model("llama"), MoPEConfig(expert_type="ia3", **common), adapter_name="out")
    model.add_adapter("in", MoPEConfig(expert_type="ia3", feedforward_modules=["down_proj"], **common))
    model.add_adapter("l1", MoPEConfig(**common))
    model.add_adapter("l2", MoPEConfig(**common))
    model.base_model.set_adapter(["out", "in", "l1", "l2"])  # the forward: W diag(in) * out + dW1 + dW2
    model.eval()
    batch = make_batch("llama")
    unmerged = no_grad_logits(model, batch)
    for name in ("in", "out", "l2", "l1"):
        model.merge_adapter(adapter_names=[name])
    torch.testing.assert_close(no_grad_logits(model, batch), unmerged, rtol=0, atol=1e-5)


def test_unmerging_an_ia3_scale_of_zero_restores_the_base():
    # unfolding divided by the scale: a 0 wrote a NaN row into the frozen weight, silently
    model = two_mergeable_adapters()
    layers = [m for m in model.modules() if isinstance(m, MoPELayer)]
    with torch.no_grad():
        for layer in layers:
            layer.mope_experts["scale"].ia3_l[0, :3] = 0.0
    weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    batch = make_batch("llama")
    unmerged = no_grad_logits(model, batch)
    model.base_model.set_adapter(["lora", "scale"])
    both = no_grad_logits(model, batch)
    model.merge_adapter()  # 'scale' is folded first; its zero scale keeps a copy of the base
    torch.testing.assert_close(no_grad_logits(model, batch), both, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for layer, weight in zip(layers, weights, strict=True):
        assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged_adapters
    assert not torch.allclose(unmerged, both)
    model = lora_and_output_scaling_ia3()  # the forward's order is 'lora' then 'scale': mergeable one at a time
    layers = [m for m in model.modules() if isinstance(m, MoPELayer)]
    with torch.no_grad():
        for layer in layers:
            layer.mope_experts["scale"].ia3_l[0, :3] = 0.0
    weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    both = no_grad_logits(model, batch)
    model.merge_adapter(["lora"])  # alone: subtracting undoes it
    model.merge_adapter(["scale"])  # kept after 'lora' was folded: restoring it undoes 'scale' only
    assert all(layer.merged_adapters == ["lora", "scale"] for layer in layers)
    torch.testing.assert_close(no_grad_logits(model, batch), both, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for layer, weight in zip(layers, weights, strict=True):
        torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(no_grad_logits(model, batch), both, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ["top_k", "dense"])
def test_training_steps_leave_no_routing_or_loss_record_alive(router):
    """After eager training steps with router losses, nothing a step built for its losses stays alive: a cycle
    through an autograd node (an object on a Function's context that holds the Function's own output) is never
    freed in a model's step, as the fused triton layer once showed (its test: tests/test_triton_kernels.py)."""
    import gc

    config = MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=2, router=router,
        init_weights=False, z_loss_coef=0.01, importance_loss_coef=0.01,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config).train()
    for _ in range(3):
        model(**make_batch("llama", pad=2)).loss.backward()
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o).__name__ in ("Routing", "LossRecord", "LossSums")]
    assert alive == []


def test_a_forward_that_raises_a_block_leader_or_a_deleted_adapter_keeps_nothing_alive():
    # a forward that raised left its call recording (its records held the graph); a block leader's routing held
    # the last forward's graph; a deleted adapter's routers stayed in the kept sequence decisions
    import gc

    def alive() -> list:
        gc.collect()
        return [o for o in gc.get_objects() if type(o).__name__ in ("Routing", "LossRecord")]

    config = MoPEConfig(target_modules=["q_proj", "k_proj"], router_blocks=["self_attn"], init_weights=False)
    model = get_peft_model(make_model("llama"), config).train()
    lm_head = model.get_base_model().lm_head
    lm_head.register_forward_pre_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        model(**make_batch("llama"))
    assert not model.base_model.routing_context.call.collecting and alive() == []
    lm_head._forward_pre_hooks.clear()
    out = model(**make_batch("llama"))
    del out
    assert alive() == []  # the block leader's routing went with its output
    model.add_adapter("other", MoPEConfig(target_modules=["v_proj"], routing_level="sequence", init_weights=False))
    model.base_model.set_adapter("other")
    model.eval()(**make_batch("llama"))  # an eval forward keeps its sequence decisions
    decisions = model.base_model.routing_context.decisions.decisions
    assert decisions
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert not model.base_model.routing_context.decisions.decisions


def test_a_refused_training_forward_counts_no_schedule_step():
    # the schedule advanced before the aux loss was found to have no place (return_dict=False without labels)
    config = MoPEConfig(target_modules=["q_proj"], router_schedule_steps=10, router_schedule_start_top_k=4)
    model = get_peft_model(make_model("llama"), config).train()
    batch = {k: v for k, v in make_batch("llama").items() if k != "labels"}
    for _ in range(3):
        with pytest.raises(ValueError):
            model(**batch, return_dict=False)
    assert model.base_model.mope_schedule["default"].count == 0
    model(**batch)
    assert model.base_model.mope_schedule["default"].count == 1


def test_unload_gives_checkpointed_layers_back_their_checkpoint_function():
    # the wrapper that recomputes a layer with its routing call stayed after unload, keeping the dead tuner's
    # context (and its last call's inputs) alive, and a new adapter stacked a second wrapper on it
    base = make_model("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    own = {
        name: m._gradient_checkpointing_func
        for name, m in base.named_modules()
        if m.__dict__.get("gradient_checkpointing")
    }
    assert own
    for _ in range(2):  # the second round wraps the unloaded model again
        model = get_peft_model(base, MoPEConfig(target_modules=["q_proj"]))
        model.train()
        model(**make_batch("llama")).loss.backward()
        wrapped = base.get_submodule(next(iter(own)))._gradient_checkpointing_func
        assert wrapped.__wrapped__ is own[next(iter(own))]  # one wrapper, around transformers' function
        base = model.unload()
        assert {name: base.get_submodule(name)._gradient_checkpointing_func for name in own} == own


@pytest.mark.parametrize(
    ("model_class", "task_type", "head"),
    [
        ("BertForTokenClassification", "TOKEN_CLS", "classifier"),
        ("BertForQuestionAnswering", "QUESTION_ANS", "qa_outputs"),
        ("BertForSequenceClassification", "SEQ_CLS", "classifier"),
    ],
)
def test_a_task_head_trained_whole_takes_no_experts(model_class, task_type, head):
    # 'all-linear' wrapped TOKEN_CLS's and QUESTION_ANS's head, which PEFT's task class then trains whole: a
    # TypeError naming no field, after the injection (the model was left wrapped)
    import transformers

    def bert():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
        return getattr(transformers, model_class)(config).eval()

    model = get_peft_model(bert(), MoPEConfig(task_type=task_type, target_modules="all-linear"))
    assert not isinstance(model.base_model.model.get_submodule(head), MoPELayer)
    # q, k, v, attention out, ffn in and out (and the pooler, which only sequence classification has)
    assert sum(isinstance(m, MoPELayer) for m in model.modules()) == 6 + (task_type == "SEQ_CLS")
    base = bert()
    before = [(name, type(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()]
    if task_type == "SEQ_CLS":  # PEFT's class puts its head in modules_to_save first, and leaves it out itself
        return
    with pytest.raises(ValueError, match=f"target_modules matches '{head}', which is trained whole"):
        get_peft_model(base, MoPEConfig(task_type=task_type, target_modules=["query", head]))
    assert [
        (name, type(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()
    ] == before


def test_a_model_that_trained_with_gradient_checkpointing_still_pickles():
    # the checkpoint wrapper was a closure: pickle.dumps(model) (torch.save of the object, spawn arguments) failed
    import pickle

    model = get_peft_model(make_model("llama"), MoPEConfig(target_modules=["q_proj"], routing_level="sequence"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(**make_batch("llama")).loss.backward()
    model.get_base_model().disable_input_require_grads()  # transformers' own hook is a closure too (a ViT has none)
    again = pickle.loads(pickle.dumps(model))
    batch = make_batch("llama")
    torch.testing.assert_close(no_grad_logits(again.eval(), batch), no_grad_logits(model.eval(), batch), rtol=0, atol=0)
