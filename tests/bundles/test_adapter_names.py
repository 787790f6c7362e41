"""Adapter names that are also parts of module paths ('mlp', '0'): their tensors are told apart by place, not by
substring, and a load_adapter whose tensors are refused leaves no half-made adapter behind."""

from __future__ import annotations

import pytest
import torch
from conftest import bundle_config, make_batch, make_model, no_grad_logits
from peft import PeftModel, get_peft_model

import mope
import mope.tuner
from mope.layer import MoPELayer
from mope.peft_compat import PEFT_CHECKS_LOADED_TENSORS


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


def test_a_nested_classification_head_round_trips(tmp_path):
    # RoBERTa's head is classifier.dense + classifier.out_proj: PEFT saves 'classifier.dense.weight', and the
    # bundle check expected 'classifier.default.dense.weight' (the name is not second to last there): load refused
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=40, num_labels=3,
    )  # fmt: skip

    def base():
        torch.manual_seed(0)
        return transformers.RobertaForSequenceClassification(config).eval()

    adapter = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["query"], num_experts=2, top_k=1, r=2)
    torch.manual_seed(1)
    model = get_peft_model(base(), adapter).eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "modules_to_save" in n and "out_proj" in n).add_(0.5)
    mope.save_pretrained(model, tmp_path / "bundle")
    ids = {"input_ids": torch.randint(3, 100, (2, 7))}
    loaded = PeftModel.from_pretrained(base(), tmp_path / "bundle")
    torch.testing.assert_close(no_grad_logits(loaded, ids), no_grad_logits(model, ids), rtol=0, atol=0)
