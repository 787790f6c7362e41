"""Adapter names are keys of mope's per-adapter dicts and folder names in saves: names that would be read as a path
or as one of mope's own dicts are refused before anything changes."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from conftest import Snapshot, bundle_config, make_batch, make_model, no_grad_logits
from peft import get_peft_model

import mope


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("/tmp/elsewhere", "may not hold '/'"),  # PEFT saved it to os.path.join(target, name): the absolute path
        ("x/", "may not hold '/'"),  # saved into the same folder as an adapter 'x'
        ("a\\b", "may not hold '/'"),
        (".hidden", "start with '.'"),
        (
            "mope_experts",
            "mope's modules use that name",
        ),  # 'lora_A' then read adapter 'mope_experts' tensors as its own
        ("mope_schedule", "mope's modules use that name"),
        ("training", "mope's modules use that name"),  # torch's KeyError said nothing of an adapter name
        ("lora_B", "mope's modules use that name"),  # PEFT 0.19 stripped it from whole-FFN keys: an unloadable save
        ("  ", "give a non-empty string"),
    ],
)
def test_a_name_that_saves_elsewhere_or_reads_as_a_dict_is_refused(name, words):
    model = get_peft_model(make_model("llama"), bundle_config())
    before = Snapshot.of(model, make_batch("llama"))
    with pytest.raises(ValueError, match=rf"adapter name {name!r}: .*{words}".replace("\\", "\\\\")):
        model.add_adapter(name, bundle_config())
    before.assert_same(model, make_batch("llama"))
    base = make_model("llama")
    with pytest.raises(ValueError, match="adapter name"):
        get_peft_model(base, bundle_config(), adapter_name=name)
    assert not hasattr(base, "peft_config")


def test_a_name_ending_like_the_schedule_dict_loads_its_bundle(tmp_path):
    # the integer-tensor rule was a substring test: 'my_mope_schedule' experts were taken for a schedule step
    config = bundle_config(router_schedule_steps=4, router_schedule_start_top_k=2)
    model = get_peft_model(make_model("llama"), config, adapter_name="my_mope_schedule").eval()
    want = no_grad_logits(model, make_batch("llama"))
    mope.save_pretrained(model, tmp_path / "bundle")
    folder = tmp_path / "bundle" / "my_mope_schedule"  # a named adapter saves into its subfolder, as in PEFT
    loaded = mope.load_mope(make_model("llama"), folder, adapter_name="my_mope_schedule")
    torch.testing.assert_close(no_grad_logits(loaded.eval(), make_batch("llama")), want, rtol=0, atol=0)


def test_a_big_float_step_is_named_not_printed(tmp_path):
    config = bundle_config(router_schedule_steps=4, router_schedule_start_top_k=2)
    mope.save_pretrained(get_peft_model(make_model("llama"), config), tmp_path / "bundle")
    path = tmp_path / "bundle" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["base_model.mope_schedule.step"] = torch.zeros(1000, 100)
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(ValueError, match=r"step \(torch\.float32: shape \[1000, 100\]\)\.$") as error:
        mope.load_mope(make_model("llama"), tmp_path / "bundle")
    assert len(str(error.value)) < 400


def test_a_refused_adapter_with_a_schedule_leaves_no_schedule_dict():
    model = get_peft_model(make_model("llama"), bundle_config())
    before = Snapshot.of(model, make_batch("llama"))
    bad = bundle_config(target_modules=["nothing_here"], router_schedule_steps=4, router_schedule_start_top_k=2)
    with pytest.raises(ValueError, match="nothing_here"):
        model.add_adapter("second", bad)
    before.assert_same(model, make_batch("llama"))
    assert "mope_schedule" not in model.base_model._modules


def test_a_negative_schedule_step_is_refused_where_it_loads():
    # PEFT < 0.21 loads tensors without mope's value checks: the first forward then failed with "index k out of range"
    config = bundle_config(router_schedule_steps=4, router_schedule_start_top_k=2)
    model = get_peft_model(make_model("llama"), config)
    state = {"base_model.mope_schedule.default.step": torch.tensor(-3)}
    with pytest.raises(ValueError, match=r"'base_model\.mope_schedule\.default\.step' is -3: a router schedule's step"):
        model.load_state_dict(state, strict=False)
