"""mope.from_lora_adapters, checked against adapters that real PEFT trained and saved (the Arrow gate built on them:
routing/test_arrow.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import LLAMA_TARGETS, make_batch, make_model, train_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import mope
from mope.layer import MoPELayer


def peft_logits(model_name: str, path: Path, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(make_model(model_name), path)(**batch).logits


def one_expert_config(num_experts: int) -> mope.MoPEConfig:
    """Task-level top-1 routing: task t gets all gate weight on expert t once the router weight is the identity."""
    return mope.MoPEConfig(
        task_type="CAUSAL_LM", num_experts=num_experts, top_k=1, routing_level="task", num_tasks=num_experts
    )


def route_task_t_to_expert_t(model) -> None:
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MoPELayer):
                layer.mope_router["default"].weight.copy_(10 * torch.eye(layer.mope_router["default"].num_experts))


def mope_layers(model) -> list[MoPELayer]:
    return [m for m in model.modules() if isinstance(m, MoPELayer)]


def test_each_expert_reproduces_its_peft_adapter(llama_adapters):
    batch = make_batch("llama", pad=2)
    model = mope.from_lora_adapters(make_model("llama"), llama_adapters, one_expert_config(3))
    route_task_t_to_expert_t(model)
    assert {m.module_name.split(".")[-1] for m in mope_layers(model)} == set(LLAMA_TARGETS)
    assert mope_layers(model)[0].mope_experts["default"].lora_A.shape[:2] == (3, 4)  # padded to the largest rank
    for expert, path in enumerate(llama_adapters):
        with torch.no_grad():
            got = model(**batch, mope_task_ids=torch.full((2,), expert)).logits
        torch.testing.assert_close(got, peft_logits("llama", path, batch), rtol=0, atol=1e-5)


def test_frozen_experts_stay_frozen_and_round_trip(llama_adapters, tmp_path):
    model = mope.from_lora_adapters(make_model("llama"), llama_adapters[:2], mope.MoPEConfig(top_k=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mope_router" in n for n in trainable)
    model.set_adapter("default")  # PEFT's set_adapter marks adapter layers trainable: not the frozen experts
    assert not any(p.requires_grad for n, p in model.named_parameters() if "mope_experts" in n)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable
    batch = make_batch("llama", pad=2)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)

    open_model = mope.from_lora_adapters(make_model("llama"), llama_adapters[:2], trainable=True)
    assert all(p.requires_grad for n, p in open_model.named_parameters() if "mope_experts" in n)


def test_gpt2_conv1d_adapter_is_reproduced(tmp_path):
    targets = {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}
    paths = [train_lora("gpt2", tmp_path / f"g{i}", seed=i, r=2 + 2 * i, lora_alpha=4, **targets) for i in range(2)]
    model = mope.from_lora_adapters(make_model("gpt2"), paths, one_expert_config(2))
    route_task_t_to_expert_t(model)
    batch = make_batch("gpt2", pad=2)
    for expert, path in enumerate(paths):
        with torch.no_grad():
            got = model(**batch, mope_task_ids=torch.full((2,), expert)).logits
        torch.testing.assert_close(got, peft_logits("gpt2", path, batch), rtol=0, atol=1e-5)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_refused(paths, match: str, config=None, model_name: str = "llama") -> None:
    base = make_model(model_name)
    before = state(base)
    with pytest.raises(ValueError, match=match):
        mope.from_lora_adapters(base, paths, config)
    assert not any(isinstance(m, MoPELayer) for m in base.modules())
    after = state(base)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_adapters_are_refused_and_the_model_is_left_alone(llama_adapters, tmp_path):
    good = llama_adapters[0]

    def variant(name: str, **changes) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit_config(folder, **changes)
        return folder

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    assert_refused([good, missing], r"missing'.*adapter_model\.safetensors")
    assert_refused([good, variant("ia3", peft_type="IA3")], r"ia3'.*not 'LORA'")
    broken, listed = variant("broken"), variant("listed")
    (broken / "adapter_config.json").write_text('{"peft_type": ')
    (listed / "adapter_config.json").write_text("[]")
    assert_refused([good, broken], r"broken'.*adapter_config\.json is not JSON")  # was a bare JSONDecodeError
    assert_refused([good, listed], r"listed'.*holds a JSON list")  # was an AttributeError
    assert_refused([good, variant("bias", bias="all")], r"bias'.*bias='all'")
    assert_refused([good, variant("dora", use_dora=True)], r"dora'.*use_dora")
    assert_refused([good, variant("pissa", init_lora_weights="pissa")], "changes the base weights")
    named = [variant(name, base_model_name_or_path=f"org/{name}") for name in ("one", "other")]
    assert_refused(named, "other'.*made for base model 'org/other', but .* for 'org/one'")
    assert_refused([good], "expert_type='adapter'", mope.MoPEConfig(expert_type="adapter"))
    assert_refused([good, good], "top_k", mope.MoPEConfig(top_k=3))
    assert_refused([], "paths is empty")
    assert_refused(str(good), "is one path; give a list")  # its characters were read as folders
    assert_refused([good, variant("ga", init_lora_weights="lora_ga")], "'lora_ga' changes the base weights")
    if "kasa_config" in {f.name for f in dataclasses.fields(peft.LoraConfig)}:  # PEFT 0.19 knows no KaSA (drops it)
        assert_refused([good, variant("kasa", kasa_config={"r": 2})], r"kasa'.*kasa_config is not supported \(KaSA")
    nan = variant("nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    first = next(key for key in tensors if "lora_A" in key)
    save_file({**tensors, first: tensors[first] * float("nan")}, nan / "adapter_model.safetensors")
    assert_refused([good, nan], r"nan'.*lora_A or lora_B holds NaN")  # was an SVD error after the model was wrapped

    extra = variant("extra")
    tensors = load_file(extra / "adapter_model.safetensors")
    base_head = make_model("llama").lm_head.weight.detach()
    save_file({**tensors, "base_model.model.lm_head.base_layer.weight": base_head}, extra / "adapter_model.safetensors")
    mope.from_lora_adapters(make_model("llama"), [extra])  # a copy of the base's own weight is fine
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(128, 64)}, extra / "adapter_model.safetensors")
    assert_refused([extra], r"extra'.*tensor 'base_model\.model\.lm_head\.weight' is not a LoRA A/B weight and differs")
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(128, 32)}, extra / "adapter_model.safetensors")
    assert_refused([extra], r"has shape \[128, 32\], the base model's 'lm_head\.weight' \[128, 64\]")


def test_what_a_mixture_of_loras_cannot_hold_is_named(llama_adapters, tmp_path):
    # an Embedding's LoRA was "not a LoRA A/B weight and differs from the base model's"; a loaded PeftModel in paths
    # a bare TypeError from os.fspath; layers_to_transform was ignored (every layer of the LoRAs got experts)
    good = llama_adapters[0]
    embedding = tmp_path / "embedding"
    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "embed_tokens"])
    get_peft_model(make_model("llama"), config).save_pretrained(embedding)
    assert_refused([embedding], r"module 'model\.embed_tokens' is an embedding .* only Linear / Conv1D LoRAs")
    loaded = PeftModel.from_pretrained(make_model("llama"), good)
    assert_refused([good, loaded], "paths holds a PeftModelForCausalLM; give the LoRA folders")
    assert_refused(
        [good], "layers_to_transform / layers_pattern cannot narrow", mope.MoPEConfig(layers_to_transform=[0])
    )
    paths = (str(path) for path in llama_adapters)  # a generator: read once (the type check emptied it)
    assert mope.from_lora_adapters(make_model("llama"), paths).peft_config["default"].num_experts == len(llama_adapters)


def test_mismatched_modules_and_shapes_are_refused(llama_adapters, tmp_path):
    good = llama_adapters[0]
    fewer = train_lora("llama", tmp_path / "fewer", seed=4, r=2, target_modules=["q_proj"])
    assert_refused([good, fewer], r"r2'.*adapts module 'model\.layers\.0\.mlp\.down_proj', which .*fewer' does not")
    assert_refused([good], r"target_modules=.*leaves out module", mope.MoPEConfig(target_modules=["q_proj"]))
    # exclude_modules alone dropped modules without a word: expert e no longer matched its adapter
    assert_refused([good], r"exclude_modules=.*leaves out module", mope.MoPEConfig(exclude_modules=["q_proj"]))
    assert_refused([good], "num_experts=3", mope.MoPEConfig(num_experts=3))
    assert_refused(
        [good], "picks module .* which the adapters do not adapt", mope.MoPEConfig(target_modules="all-linear")
    )
    mope.from_lora_adapters(make_model("llama"), [good], mope.MoPEConfig(top_k=1, target_modules=LLAMA_TARGETS))
    gpt2 = train_lora("gpt2", tmp_path / "gpt2", seed=5, r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    assert_refused([gpt2], "c_attn' is not in the base model")
    assert_refused(
        [train_lora_on(tmp_path / "wide", hidden=32)], r"wide'.*lora_B \[32, 2\] do not fit its 128 -> 64 features"
    )


def train_lora_on(folder: Path, hidden: int) -> Path:
    """A LoRA saved from a Llama of another hidden size (same module names)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(transformers.LlamaForCausalLM(config), LoraConfig(r=2, target_modules=LLAMA_TARGETS))
    model.save_pretrained(folder)
    return folder
