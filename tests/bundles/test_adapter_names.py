"""Adapter names that are also parts of module paths ('mlp', '0'): their tensors are told apart by place, not by
substring, and a load_adapter whose tensors are refused leaves no half-made adapter behind."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import bundle_config, make_batch, make_model, no_grad_logits
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import mope
import mope.tuner
from mope.layer import MoPELayer
from mope.peft_compat import PEFT_ASKS_SAVED_KEYS, PEFT_CHECKS_LOADED_TENSORS, key_names_adapter


def saved(folder):
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), bundle_config()).eval()
    model.save_pretrained(folder)
    return no_grad_logits(model, make_batch("llama"))


@pytest.mark.parametrize("name", ["mlp", "0", "model"])
@pytest.mark.parametrize("first", [True, False], ids=["named-second", "named-first"])
def test_an_adapter_named_like_a_module_loads_beside_another(tmp_path, name, first):
    # the substring rule took the other adapter's 'layers.0' / '.mlp.' tensors for this one's: load refused
    want = saved(tmp_path / "bundle")
    names = (("default", name), ("other", name))[not first]
    names = names if first else names[::-1]
    model = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle", adapter_name=names[0])
    model.load_adapter(str(tmp_path / "bundle"), adapter_name=names[1])
    for adapter in names:
        model.set_adapter(adapter)
        torch.testing.assert_close(no_grad_logits(model.eval(), make_batch("llama")), want, rtol=0, atol=0)


@pytest.mark.skipif(not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads without asking the tuner")
def test_a_new_adapter_whose_tensors_are_refused_is_removed_again(tmp_path, monkeypatch):
    saved(tmp_path / "bundle")
    model = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle")
    before = no_grad_logits(model, make_batch("llama"))
    monkeypatch.setattr(mope.tuner, "describe_bad_values", lambda items: "NaN or inf values in (test)")
    with pytest.raises(ValueError, match="'second'; nothing was loaded: NaN or inf values in"):
        model.load_adapter(str(tmp_path / "bundle"), adapter_name="second")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert all("second" not in m.mope_experts for m in model.modules() if isinstance(m, MoPELayer))
    torch.testing.assert_close(no_grad_logits(model, make_batch("llama")), before, rtol=0, atol=0)


def tiny_roberta():
    """RoBERTa for sequence classification: its head is a module (dense + out_proj), not a Linear."""
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=40, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(config).eval()


def test_a_nested_classification_head_round_trips(tmp_path):
    # RoBERTa's head is classifier.dense + classifier.out_proj: PEFT saves 'classifier.dense.weight', and the
    # bundle check expected 'classifier.default.dense.weight' (the name is not second to last there): load refused
    base = tiny_roberta
    adapter = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["query"], num_experts=2, top_k=1, r=2)
    torch.manual_seed(1)
    model = get_peft_model(base(), adapter).eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "modules_to_save" in n and "out_proj" in n).add_(0.5)
    mope.save_pretrained(model, tmp_path / "bundle")
    ids = {"input_ids": torch.randint(3, 100, (2, 7))}
    loaded = PeftModel.from_pretrained(base(), tmp_path / "bundle")
    torch.testing.assert_close(no_grad_logits(loaded, ids), no_grad_logits(model, ids), rtol=0, atol=0)


def ffn_model(name: str = "default"):
    torch.manual_seed(0)
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["mlp"], num_experts=4, top_k=2, r=4, init_weights=False
    )
    return get_peft_model(make_model("llama"), config, adapter_name=name).eval()


@pytest.mark.parametrize("saved_as", ["trained", "down"])  # 'down': a projection's name (PEFT 0.19 lost 2 of 3)
def test_whole_ffn_bundles_load_under_any_adapter_name(tmp_path, saved_as):
    # their keys held the adapter's name inside ("mope_experts.default.down.lora_A"): loading under another was refused
    model = ffn_model(saved_as)
    want = no_grad_logits(model, make_batch("llama"))
    model.save_pretrained(tmp_path)
    bundle = tmp_path / saved_as  # PEFT's folder for an adapter not named 'default'
    if PEFT_ASKS_SAVED_KEYS:  # older PEFT keeps the name there, and loading drops it
        named = re.compile(rf"mope_experts\.{saved_as}\.(gate|up|down)\.")
        assert not [key for key in load_file(bundle / "adapter_model.safetensors") if named.search(key)]
    base = make_model("llama")
    torch.manual_seed(7)  # other experts than the saved ones before loading: a tensor left out shows
    loaded = PeftModel.from_pretrained(base, bundle, adapter_name="x").eval()
    loaded.load_adapter(str(bundle), adapter_name="second")
    for adapter in ("x", "second"):
        loaded.set_adapter(adapter)
        torch.testing.assert_close(no_grad_logits(loaded.eval(), make_batch("llama")), want, rtol=0, atol=0)


def test_whole_ffn_experts_load_with_low_cpu_mem_usage(tmp_path):
    # their layer moved the meta-device experts to the base's device: "Cannot copy out of meta tensor"
    model = ffn_model()
    want = no_grad_logits(model, make_batch("llama"))
    model.save_pretrained(tmp_path / "bundle")
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle", low_cpu_mem_usage=True)
    torch.testing.assert_close(no_grad_logits(loaded.eval(), make_batch("llama")), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "model", "weight"])
def test_saving_beside_an_adapter_named_like_a_module_keeps_every_tensor(tmp_path, name):
    # PEFT's save drops every key holding another adapter's name as a dotted part: 'default' lost its '.mlp.' tensors
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), bundle_config()).eval()
    want = no_grad_logits(model, make_batch("llama"))
    count = len([key for key in model.state_dict() if key_names_adapter(key, "default")])
    model.add_adapter(name, bundle_config())
    mope.save_pretrained(model, tmp_path / "bundle")
    assert len(load_file(tmp_path / "bundle" / "adapter_model.safetensors")) == count
    assert len(load_file(tmp_path / "bundle" / name / "adapter_model.safetensors")) == count
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle").eval()
    torch.testing.assert_close(no_grad_logits(loaded, make_batch("llama")), want, rtol=0, atol=0)
    assert list(model.peft_config) == ["default", name]  # the save's narrowed view is gone


def test_unload_gives_back_a_nested_head_trained_whole():
    # RoBERTa's classifier is a module, not a Linear: PEFT's swap copied a '.weight' onto it and unload stopped with
    # the attention layers already unwrapped and the head still wrapped
    adapter = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["query"], num_experts=1, top_k=1, r=2)
    model = get_peft_model(tiny_roberta(), adapter).eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "modules_to_save" in n and "out_proj" in n).add_(0.5)
    ids = {"input_ids": torch.randint(3, 100, (2, 7))}
    want = no_grad_logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged.classifier).__name__ == "RobertaClassificationHead"
    assert not any(isinstance(m, MoPELayer) for m in merged.modules())
    torch.testing.assert_close(no_grad_logits(merged, ids), want, rtol=1e-5, atol=1e-5)
