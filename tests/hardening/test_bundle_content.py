"""Bundle content (issue 16): every tensor's dtype and values are checked once per load, before any weight is
copied; NaN/inf values and integer parameters are refused naming the tensors, and the model is left as it was.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from conftest import bundle_config, make_batch, make_model, no_grad_logits, tiny_bert
from peft import PeftModel, get_peft_model

import mope
from mope.layer import MoPELayer
from mope.peft_compat import PEFT_CHECKS_LOADED_TENSORS, without_ffn_name


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda t: t.fill_(float("nan")), r"NaN or inf values in base_model\.model\..*lora_B"),
        (lambda t: t.fill_(float("inf")), r"NaN or inf values in"),
        (lambda t: t.to(torch.int64), r"non-float tensors where parameters must be floats: .*lora_B \(torch.int64\)"),
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


def damaged_bundle(folder, damage, config=None, suffix="lora_B"):
    """A saved bundle with its first tensor whose name ends in ``suffix`` replaced by ``damage(tensor)``."""
    mope.save_pretrained(get_peft_model(make_model("llama"), config or bundle_config()), folder)
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[key] = damage(tensors[key].clone())
    safetensors.torch.save_file(tensors, path)
    return folder


def safetensors_stores(dtype: torch.dtype) -> bool:
    """Whether the installed safetensors writes ``dtype`` (0.4.3, the oldest supported, has no complex)."""
    try:
        safetensors.torch.save({"x": torch.zeros(1, dtype=dtype)})
    except (KeyError, ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda t: t.bool(), r"non-float tensors where parameters must be floats: .*lora_B \(torch.bool\)"),
        pytest.param(
            lambda t: t.to(torch.complex64),
            r"non-float tensors where parameters must be floats: .*\(torch.complex64\)",
            marks=pytest.mark.skipif(
                not safetensors_stores(torch.complex64), reason="this safetensors cannot write complex tensors"
            ),
        ),
        (lambda t: t.fill_(float("nan")).to(torch.float8_e4m3fn), r"NaN or inf values in .*lora_B"),
    ],
    ids=["bool", "complex", "float8-nan"],
)
def test_other_dtypes_are_named_as_what_they_are(tmp_path, damage, words):
    folder = damaged_bundle(tmp_path / "bundle", damage)
    model = make_model("llama")
    with pytest.raises(ValueError, match=words):
        mope.load_mope(model, folder)
    assert not any(isinstance(m, MoPELayer) for m in model.modules())


def test_a_float8_bundle_with_finite_values_loads(tmp_path):
    folder = damaged_bundle(tmp_path / "bundle", lambda t: t.to(torch.float8_e4m3fn))
    assert torch.isfinite(no_grad_logits(mope.load_mope(make_model("llama"), folder), make_batch("llama"))).all()


@pytest.mark.parametrize(
    ("damage", "words"),
    [(lambda t: t - 5, r"int64: -5"), (torch.Tensor.float, r"float32: 0\.0")],
    ids=["negative", "float"],
)
def test_a_schedule_step_must_be_a_non_negative_integer(tmp_path, damage, words):
    config = bundle_config(router_schedule_steps=10, router_schedule_start_top_k=4)
    folder = damaged_bundle(tmp_path / "bundle", damage, config, suffix="mope_schedule.step")
    model = make_model("llama")
    words = rf"a schedule step that is not a non-negative integer: base_model\.mope_schedule\.step \(torch\.{words}\)"
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors' cannot be loaded: {words}"):
        mope.load_mope(model, folder)
    assert not any(isinstance(m, MoPELayer) for m in model.modules())


def add_tensor(folder, name):
    path = folder / "adapter_model.safetensors"
    safetensors.torch.save_file({**safetensors.torch.load_file(path), name: torch.zeros(2)}, path)
    return folder


@pytest.mark.skipif(not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads without asking the tuner")
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda f: damaged_bundle(f, lambda t: t.fill_(float("nan"))), r"nothing was loaded: NaN or inf values in "),
        (
            lambda f: add_tensor(damaged_bundle(f, lambda t: t), "foo.bar"),
            r"nothing was loaded: 1 tensors have no place .*'foo\.bar'",
        ),
    ],
    ids=["nan", "extra-tensor"],
)
def test_load_adapter_into_a_loaded_name_checks_the_values_and_names_too(tmp_path, damage, words):
    """PEFT reads no config on this path, so the check runs on the tensors PEFT hands the tuner."""
    folder = damage(tmp_path / "bundle")
    model = get_peft_model(make_model("llama"), bundle_config())
    batch = make_batch("llama")
    before = no_grad_logits(model, batch)
    with pytest.raises(ValueError, match=rf"^Cannot load these weights into MoPE adapter 'default'; {words}"):
        model.load_adapter(str(folder), adapter_name="default")
    torch.testing.assert_close(no_grad_logits(model, batch), before, rtol=0, atol=0)


@pytest.mark.skipif(not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads without asking the tuner")
def test_from_pretrained_with_an_explicit_config_checks_the_values(tmp_path):
    """An explicit config= skips MoPEConfig.from_pretrained, where the file's values are read otherwise."""
    folder = damaged_bundle(tmp_path / "bundle", lambda t: t.fill_(float("nan")))
    with pytest.raises(ValueError, match=r"nothing was loaded: NaN or inf values in "):
        PeftModel.from_pretrained(make_model("llama"), folder, config=bundle_config())


@pytest.mark.skipif(not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads without asking the tuner")
@pytest.mark.parametrize("how", ["existing-name", "explicit-config"])
def test_a_bundle_cannot_overwrite_a_frozen_base_weight(tmp_path, how):
    # the check only refused keys the model lacks: a base weight's key loaded (strict=False) over the frozen base
    folder = add_tensor(damaged_bundle(tmp_path / "bundle", lambda t: t), "base_model.model.model.norm.weight")
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["base_model.model.model.norm.weight"] = torch.zeros(64)
    safetensors.torch.save_file(tensors, path)
    model = get_peft_model(make_model("llama"), bundle_config()) if how == "existing-name" else make_model("llama")
    norm = model.get_base_model().model.norm.weight.clone() if how == "existing-name" else model.model.norm.weight
    norm = norm.clone()
    with pytest.raises(ValueError, match=r"nothing was loaded: 1 tensors are the frozen base model's own weights"):
        if how == "existing-name":
            model.load_adapter(str(folder), adapter_name="default")
        else:
            PeftModel.from_pretrained(model, folder, config=bundle_config())
    base = model.get_base_model() if how == "existing-name" else model
    torch.testing.assert_close(base.model.norm.weight, norm, rtol=0, atol=0)


@pytest.mark.skipif(not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads without asking the tuner")
def test_a_tensor_given_with_and_without_the_adapter_name_is_refused(tmp_path):
    # both keys load into one tensor; the later one (zeros) silently won
    folder = damaged_bundle(tmp_path / "bundle", lambda t: t)
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("mope_experts.lora_B"))
    tensors[key.replace("mope_experts.", "mope_experts.second.")] = torch.zeros_like(tensors[key])
    safetensors.torch.save_file(tensors, path)
    model = get_peft_model(make_model("llama"), bundle_config())
    model.add_adapter("second", bundle_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing was loaded: '.*mope_experts\.second\.lora_B' and '.*' both load"):
        model.load_adapter(str(folder), adapter_name="second")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_whole_ffn_tensor_saved_with_and_without_a_name_is_refused(tmp_path):
    config = bundle_config(target_modules=["mlp"])
    folder = damaged_bundle(tmp_path / "bundle", lambda t: t, config, suffix="down.lora_B")
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    for key in [k for k in tensors if k.endswith("down.lora_B")]:
        # PEFT >= 0.21 saves the key without the adapter name: add a named one; older PEFT with it: add a bare one
        other = without_ffn_name(key)
        other = key.replace("mope_experts.", "mope_experts.zzz.") if other == key else other
        tensors[other] = torch.zeros_like(tensors[key])
    safetensors.torch.save_file(tensors, path)
    for load in (mope.load_mope, PeftModel.from_pretrained):
        model = make_model("llama")
        with pytest.raises(ValueError, match=r"both load into '.*mope_experts\.down\.lora_B'; a bundle holds each"):
            load(model, folder)
        assert not any(isinstance(m, MoPELayer) for m in model.modules())


def test_a_saved_output_embedding_still_loads_into_a_loaded_name(tmp_path):
    # PEFT saves a targeted (resized) lm_head's base weight with the adapter: that base key is the adapter's own
    config = bundle_config(target_modules=["q_proj", "lm_head"])
    model = get_peft_model(make_model("llama"), config).eval()
    with torch.no_grad():
        model.base_model.model.lm_head.base_layer.weight.add_(1.0)
    model.save_pretrained(tmp_path / "bundle", save_embedding_layers=True)
    assert "base_model.model.lm_head.base_layer.weight" in safetensors.torch.load_file(
        tmp_path / "bundle" / "adapter_model.safetensors"
    )
    want = no_grad_logits(model, make_batch("llama"))
    again = get_peft_model(make_model("llama"), config).eval()
    again.load_adapter(str(tmp_path / "bundle"), adapter_name="default")
    torch.testing.assert_close(no_grad_logits(again, make_batch("llama")), want, rtol=0, atol=0)


@pytest.mark.skipif(not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads without asking the tuner")
def test_a_head_of_another_size_is_refused_before_the_experts_load(tmp_path):
    # the head's shape was not compared: every expert was replaced, then torch refused the head
    folder = tmp_path / "bundle"
    config = bundle_config(task_type="SEQ_CLS", target_modules=["query"])
    mope.save_pretrained(get_peft_model(tiny_bert(num_labels=5), config), folder)
    model = get_peft_model(make_model("bert"), bundle_config(task_type="SEQ_CLS", target_modules=["query"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing was loaded: 2 tensors have other shapes \(e\.g\. '.*classifier"):
        model.load_adapter(str(folder), adapter_name="default")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_lm_head_trained_whole_and_saved_with_the_embeddings_loads(tmp_path):
    # PEFT then also writes the wrapper's own keys ('lm_head.modules_to_save.weight'), which no model has and PEFT
    # skips on load: they were refused as "no place in this model" (a PEFT LoRA loads the same file)
    config = bundle_config(target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(make_model("llama"), config).eval()
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(tmp_path / "bundle", save_embedding_layers=True)
    keys = safetensors.torch.load_file(tmp_path / "bundle" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.modules_to_save.weight" in keys
    want = no_grad_logits(model, make_batch("llama"))
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle").eval()
    torch.testing.assert_close(no_grad_logits(loaded, make_batch("llama")), want, rtol=0, atol=0)
    if PEFT_CHECKS_LOADED_TENSORS:
        loaded.load_adapter(str(tmp_path / "bundle"), adapter_name="default")
        torch.testing.assert_close(no_grad_logits(loaded, make_batch("llama")), want, rtol=0, atol=0)
