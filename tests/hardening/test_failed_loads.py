"""A failed load changes nothing (issue 16, items 1 and 4, and the unreadable adapter_config.json).

``mope.load_mope`` restores the base model whatever fails after it was touched (PEFT's task class, reading or
loading the weights); ``load_adapter`` into an adapter name in use refuses tensors that do not fit that adapter,
before any is loaded; an empty, truncated or non-object ``adapter_config.json`` is a ValueError naming the file.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import Snapshot, assert_plain, bundle_config, make_batch, make_model, no_grad_logits
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError

import mope
from mope.layer import MoPELayer
from mope.peft_compat import PEFT_CHECKS_LOADED_TENSORS

needs_load_check = pytest.mark.skipif(
    not PEFT_CHECKS_LOADED_TENSORS, reason="PEFT < 0.21 loads an adapter's tensors without asking the tuner"
)


@pytest.fixture
def bundle(tmp_path):
    """A bundle with random experts on q_proj and v_proj of the tiny Llama (2 layers: 12 tensors)."""
    torch.manual_seed(0)
    get_peft_model(make_model("llama"), bundle_config(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    return tmp_path


# --- item 1: whatever fails after injection, load_mope leaves the model as it was ----------------------------


def test_load_mope_restores_the_model_when_reading_the_weights_fails(bundle):
    # torch_device is read only when PEFT loads the weights, after the experts were attached (before: the error,
    # and the model kept 4 MoPE layers and PEFT's hooks).
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(SafetensorError, match="device nope is invalid"):
        mope.load_mope(model, bundle, torch_device="nope")
    before.assert_same(model, batch)
    assert_plain(model)


def test_load_mope_restores_the_model_when_peft_task_class_fails(bundle, monkeypatch):
    # A failure in PEFT's task class, after MoPEModel.__init__ returned (the model is already wrapped).
    wrapped = peft.PeftModelForCausalLM.__init__

    def failing_init(self, *args, **kwargs):
        wrapped(self, *args, **kwargs)
        raise RuntimeError("task class failed")

    monkeypatch.setattr(peft.PeftModelForCausalLM, "__init__", failing_init)
    model, batch = make_model("llama"), make_batch("llama")
    model.train()  # PEFT puts a loaded adapter's model in eval mode: the flags come back too
    before = Snapshot.of(model, batch)
    with pytest.raises(RuntimeError, match="task class failed"):
        mope.load_mope(model, bundle)
    before.assert_same(model, batch)
    assert_plain(model)
    assert model.training


def test_load_mope_restores_gradient_checkpointing_hooks_and_requires_grad(bundle, monkeypatch):
    # PeftModel registers an input-embedding hook for gradient checkpointing and freezes the base weights.
    monkeypatch.setattr(peft.peft_model, "load_peft_weights", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    model, batch = make_model("llama"), make_batch("llama")
    model.gradient_checkpointing_enable()
    before = Snapshot.of(model, batch)
    with pytest.raises(OSError, match="disk"):
        mope.load_mope(model, bundle, is_trainable=True)
    before.assert_same(model, batch)
    assert all(p.requires_grad for p in model.parameters())


@needs_load_check
def test_load_mope_restores_the_model_when_the_loaded_tensors_do_not_fit(bundle):
    # A key_mapping that sends q_proj's tensors to k_proj: the tensor check runs on the remapped names.
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=r"6 of the 12 tensors given have no place in it \(e\.g\. '.*k_proj"):
        mope.load_mope(model, bundle, key_mapping={"q_proj": "k_proj"})
    before.assert_same(model, batch)
    assert_plain(model)


def test_a_successful_load_mope_after_a_failed_one_matches_the_bundle(bundle):
    model = make_model("llama")
    with pytest.raises(SafetensorError):
        mope.load_mope(model, bundle, torch_device="nope")
    loaded = mope.load_mope(model, bundle)
    fresh = mope.load_mope(make_model("llama"), bundle)
    batch = make_batch("llama")
    torch.testing.assert_close(no_grad_logits(loaded, batch), no_grad_logits(fresh, batch), rtol=0, atol=0)


@needs_load_check
def test_from_pretrained_refused_at_its_tensors_leaves_the_base_model_as_it_was(bundle):
    # the refused injection's hooks stayed on the base: a retry on it was refused as a second MoPE injection
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match="nothing was loaded: 8 have other shapes"):
        PeftModel.from_pretrained(model, bundle, config=bundle_config(target_modules=["q_proj", "v_proj"], r=2))
    before.assert_same(model, batch)
    assert_plain(model)
    retried = PeftModel.from_pretrained(model, bundle)
    fresh = PeftModel.from_pretrained(make_model("llama"), bundle)
    torch.testing.assert_close(no_grad_logits(retried, batch), no_grad_logits(fresh, batch), rtol=0, atol=0)


# --- item 4: load_adapter into a name in use ------------------------------------------------------------------


# (bundle's config, the existing adapter's config, what the message says). Before: the all-linear bundle's 36
# tensors that fit no module of a q_proj adapter were dropped without a warning (6 of 42 loaded); the r=2 bundle
# raised torch's "size mismatch" RuntimeError after loading the routers' weights (the adapter was half replaced).
UNFIT = {
    "other modules": (
        {},
        {"target_modules": ["q_proj"]},
        ["MoPE adapter 'default'; nothing was loaded: 36 of the 42 tensors given have no place in it (e.g. '"],
    ),
    "other shapes, fewer modules": (
        {"target_modules": ["q_proj"], "r": 2},
        {"target_modules": ["q_proj", "v_proj"]},
        [
            "4 have other shapes (e.g. 'base_model.model.model.layers.0.self_attn.q_proj.mope_experts.default.lora_A' "
            "is [4, 2, 64], not [4, 4, 64])",
            "6 of its 12 tensors are not given (e.g. '",
        ],
    ),
}


@needs_load_check
@pytest.mark.parametrize(("saved", "existing", "wanted"), UNFIT.values(), ids=list(UNFIT))
def test_load_adapter_into_an_existing_name_refuses_tensors_that_do_not_fit_it(tmp_path, saved, existing, wanted):
    get_peft_model(make_model("llama"), bundle_config(**saved)).save_pretrained(tmp_path)
    model = get_peft_model(make_model("llama"), bundle_config(**existing)).eval()
    batch = make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError) as info:
        model.load_adapter(tmp_path, adapter_name="default")
    for words in [*wanted, "load the bundle under a new adapter_name, or delete_adapter('default') first"]:
        assert words in str(info.value)
    before.assert_same(model, batch)


def test_load_adapter_into_an_existing_name_with_the_same_tensors_replaces_them(bundle):
    # What Trainer's resume_from_checkpoint does: the adapter's tensors are replaced, its config kept.
    model = get_peft_model(make_model("llama"), bundle_config(target_modules=["q_proj", "v_proj"], init_weights=True))
    model.load_adapter(bundle, adapter_name="default")
    batch = make_batch("llama")
    want = no_grad_logits(PeftModel.from_pretrained(make_model("llama"), bundle), batch)
    torch.testing.assert_close(no_grad_logits(model.eval(), batch), want, rtol=0, atol=0)


# --- an unreadable adapter_config.json -------------------------------------------------------------------------

UNREADABLE = {
    "empty": ("", "it is not valid JSON"),
    "truncated": ('{"peft_type": "MOPE", "r": ', "it is not valid JSON"),
    "a list": ("[]", "expected a JSON object of config keys, got list"),
    "a string": ('"MOPE"', "expected a JSON object of config keys, got str"),
    "null": ("null", "expected a JSON object of config keys, got null"),  # PEFT's reading raised TypeError
    "a number": ("5", "expected a JSON object of config keys, got int"),
    "true": ("true", "expected a JSON object of config keys, got bool"),
}


@pytest.mark.parametrize(("text", "problem"), UNREADABLE.values(), ids=list(UNREADABLE))
def test_an_unreadable_config_file_is_named(bundle, text, problem):
    path = bundle / "adapter_config.json"
    path.write_text(text)
    model, batch = make_model("llama"), make_batch("llama")
    before = Snapshot.of(model, batch)
    for load in (mope.MoPEConfig.from_pretrained, lambda folder: mope.load_mope(model, folder)):
        with pytest.raises(ValueError, match=f"Cannot read '{path}': {problem}"):
            load(bundle)
    before.assert_same(model, batch)
    assert_plain(model)


def test_a_config_file_cut_after_a_valid_prefix_is_named(bundle):
    # Cut at every length: each prefix is either refused naming the file or (the whole file) loads.
    path = bundle / "adapter_config.json"
    text = path.read_text()
    for length in range(0, len(text), 97):
        path.write_text(text[:length])
        with pytest.raises(ValueError, match=f"Cannot read '{path}'"):
            mope.MoPEConfig.from_pretrained(bundle)
    path.write_text(json.dumps(json.loads(text)))
    assert mope.MoPEConfig.from_pretrained(bundle).target_modules == {"q_proj", "v_proj"}


def test_a_causal_lm_bundle_on_a_classifier_is_refused_first_and_changes_nothing(tmp_path):
    """The task type is checked before any module is wrapped; PEFT's task class would fail after it."""
    mope.save_pretrained(get_peft_model(make_model("llama"), bundle_config()), tmp_path / "bundle")
    config = make_model("llama").config
    config.pad_token_id = 0
    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(config).eval()
    batch = {k: v for k, v in make_batch("llama").items() if k != "labels"}
    before = no_grad_logits(classifier, batch)
    with pytest.raises(ValueError, match=r"task_type='CAUSAL_LM'.*LlamaForSequenceClassification cannot generate"):
        mope.load_mope(classifier, tmp_path / "bundle")
    with pytest.raises(ValueError, match=r"bundle .* was made for task_type='CAUSAL_LM'"):
        PeftModel.from_pretrained(classifier, tmp_path / "bundle")
    assert not any(isinstance(m, MoPELayer) for m in classifier.modules())
    assert not classifier._forward_pre_hooks and not classifier._forward_hooks
    torch.testing.assert_close(no_grad_logits(classifier, batch), before, rtol=0, atol=0)
