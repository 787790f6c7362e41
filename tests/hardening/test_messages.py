"""Misleading messages named (issue 16): a base model on the meta device, a forward after the only adapter was
deleted, 'all-linear' on a model without linear layers, and a module that already carries another PEFT method's
adapter each say what is wrong and what to do (before: "unknown device type for autocast", KeyError: 'default',
PEFT's "no target modules were passed", "is a Linear; MoPE experts attach to Linear").
"""

from __future__ import annotations

import accelerate
import peft
import pytest
import torch
from conftest import bundle_config, make_batch, make_model, tiny_llama
from peft import get_peft_model
from torch import nn

from mope import MoPEConfig
from mope.layer import MoPELayer

META_BUILDERS = {
    "torch.device('meta')": lambda: torch.device("meta"),
    "accelerate.init_empty_weights": accelerate.init_empty_weights,
}


@pytest.mark.parametrize("empty", META_BUILDERS.values(), ids=list(META_BUILDERS))
def test_a_base_model_on_the_meta_device_is_named_when_called(empty):
    with empty():
        base = tiny_llama()
    model = get_peft_model(base, bundle_config())  # wrapping is allowed: weights may be loaded after (to_empty)
    ids = torch.ones(1, 4, dtype=torch.long)
    for call in (lambda: model(input_ids=ids), lambda: model.generate(input_ids=ids, max_new_tokens=1)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert message.startswith("LlamaForCausalLM has weights on the meta device (e.g. 'model.embed_tokens.weight')")
        assert "torch.device('meta') or accelerate.init_empty_weights()" in message
        assert "Load its weights first" in message


def test_experts_injected_without_values_are_named_until_they_load():
    # low_cpu_mem_usage=True leaves the experts on the meta device; on CPU torch computed with them without an
    # error: NaN logits (top_k), or logits 0.16 off (hash)
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    trained = get_peft_model(make_model("llama"), bundle_config())
    batch = make_batch("llama")
    model = get_peft_model(make_model("llama"), bundle_config(), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"MoPE adapter weights are on the meta device \(e\.g\. 'model\.layers\.0\."):
        model(**batch)
    set_peft_model_state_dict(model, get_peft_model_state_dict(trained), low_cpu_mem_usage=True)
    torch.testing.assert_close(model(**batch).logits, trained(**batch).logits, rtol=0, atol=0)
    # loaded, then offloaded by accelerate before its first forward: weights on meta on purpose
    offloaded = get_peft_model(make_model("llama"), bundle_config(), low_cpu_mem_usage=True)
    set_peft_model_state_dict(offloaded, get_peft_model_state_dict(trained), low_cpu_mem_usage=True)
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    torch.testing.assert_close(offloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


def test_an_error_of_a_model_with_real_weights_is_not_renamed():
    model = get_peft_model(make_model("llama"), bundle_config())
    with pytest.raises(IndexError, match="index out of range"):
        model(input_ids=torch.full((1, 4), 999))  # an id beyond the vocabulary: torch's error, unchanged


def test_a_forward_after_deleting_the_only_adapter_says_so():
    model = get_peft_model(make_model("llama"), bundle_config())
    model.delete_adapter("default")
    with pytest.raises(KeyError) as info:
        model(**make_batch("llama"))
    message = info.value.args[0]
    assert message.startswith("MoPE adapter 'default' does not exist; no adapter is left")
    assert "(delete_adapter removed the last one): add one with add_adapter or load_adapter" in message
    assert "run the base model alone (get_base_model())" in message
    # and the model can take a new adapter and run again
    model.add_adapter("second", bundle_config())
    model.set_adapter("second")
    assert model(**make_batch("llama")).logits.shape == (2, 8, 128)


def test_a_missing_adapter_name_lists_the_adapters_that_exist():
    model = get_peft_model(make_model("llama"), bundle_config())
    model.add_adapter("other", bundle_config())
    wanted = "MoPE adapter 'typo' does not exist; select one of them with set_adapter (adapters: 'default', 'other')"
    with pytest.raises(KeyError) as info:
        model.peft_config["typo"]
    assert info.value.args[0] == wanted


class NoLinear(nn.Module):
    """Embeddings and a convolution: nothing 'all-linear' could mean."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.emb(x).transpose(1, 2))


def test_all_linear_on_a_model_without_linear_layers_says_so():
    model = NoLinear()
    with pytest.raises(ValueError, match=r"target_modules='all-linear' matches nothing: NoLinear has no nn.Linear"):
        get_peft_model(model, MoPEConfig(target_modules="all-linear"))
    assert not any(isinstance(m, MoPELayer) for m in model.modules())


def test_a_module_with_another_peft_adapter_is_named_as_such():
    model = get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=["q_proj"], r=2))
    base = model.get_base_model()
    with pytest.raises(
        ValueError, match=r"q_proj' already carries a PEFT adapter of another method \(peft\.tuners\.lora"
    ):
        get_peft_model(base, MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert not any(isinstance(m, MoPELayer) for m in base.modules())
