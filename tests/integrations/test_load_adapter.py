"""transformers' own ``model.load_adapter(bundle)`` after ``import mope``: same model as PeftModel.from_pretrained."""

from __future__ import annotations

import torch
from conftest import make_batch, make_model, no_grad_logits
from peft import PeftModel, get_peft_model

import mope


def test_transformers_load_adapter_gives_the_bundle_s_logits_and_aux_loss(tmp_path):
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2, r=2)
    trained = get_peft_model(make_model("llama"), config)
    for parameter in trained.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.1)
    mope.save_pretrained(trained, tmp_path)
    batch = make_batch("llama", pad=3)  # padded rows: the routing must see the attention mask

    model = make_model("llama")
    model.load_adapter(str(tmp_path))
    reference = PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    torch.testing.assert_close(no_grad_logits(model, batch), no_grad_logits(reference, batch), rtol=0, atol=0)
    assert not torch.allclose(no_grad_logits(model, batch), no_grad_logits(make_model("llama"), batch))
    model.train()
    output = model(**batch)
    assert output.aux_loss is not None and output.aux_loss > 0
