"""Bundle content (issue 16): every tensor's dtype and values are checked once per load, before any weight is
copied; NaN/inf values and integer parameters are refused naming the tensors, and the model is left as it was.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from conftest import bundle_config, make_batch, make_model, no_grad_logits
from peft import get_peft_model

import mope
from mope.layer import MoPELayer


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda t: t.fill_(float("nan")), r"NaN or inf values in base_model\.model\..*lora_B"),
        (lambda t: t.fill_(float("inf")), r"NaN or inf values in"),
        (lambda t: t.to(torch.int64), r"integer tensors where parameters must be floats: .*lora_B \(torch.int64\)"),
    ],
    ids=["nan", "inf", "integer"],
)
def test_bundle_values_are_checked_before_any_weight_is_copied(tmp_path, damage, words):
    mope.save_pretrained(get_peft_model(make_model("llama"), bundle_config()), tmp_path / "bundle")
    path = tmp_path / "bundle" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B"))
    tensors[key] = damage(tensors[key].clone())
    safetensors.torch.save_file(tensors, path)
    model = make_model("llama")
    batch = make_batch("llama")
    before = no_grad_logits(model, batch)
    with pytest.raises(ValueError, match=words):
        mope.load_mope(model, tmp_path / "bundle")
    assert not any(isinstance(m, MoPELayer) for m in model.modules())
    torch.testing.assert_close(no_grad_logits(model, batch), before, rtol=0, atol=0)
