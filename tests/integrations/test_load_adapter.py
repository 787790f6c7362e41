"""transformers' own ``model.load_adapter(bundle)`` after ``import mope``: same model as PeftModel.from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Snapshot, make_batch, make_model, no_grad_logits
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

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


def trained_bundle(folder, **options) -> str:
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=1, r=2, **options
    )
    trained = get_peft_model(make_model("llama"), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    mope.save_pretrained(trained, folder)
    return str(folder)


def test_a_second_mope_injection_into_one_model_is_refused_and_changes_nothing(tmp_path):
    # each injection made its own tuner: a second adapter's aux loss counted twice, its task ids were taken by the
    # first one's hook, and a third one's training forward raised KeyError
    first, second = (trained_bundle(tmp_path / name, aux_loss_coef=0.1) for name in ("a", "b"))
    batch = make_batch("llama", pad=2)
    model = make_model("llama")
    model.load_adapter(first, adapter_name="a")
    model.train()
    aux = model(**batch).aux_loss
    with pytest.raises(ValueError, match=r"already holds MoPE adapters \('a'\) from an earlier injection"):
        model.load_adapter(second, adapter_name="b")
    assert list(model.peft_config) == ["a"]
    torch.testing.assert_close(model(**batch).aux_loss, aux, rtol=0, atol=0)
    base = make_model("llama")
    get_peft_model(base, mope.MoPEConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"already holds MoPE adapters \('default'\)"):
        get_peft_model(base, mope.MoPEConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    held = PeftModel.from_pretrained(make_model("llama"), first, adapter_name="a")  # the way to hold several
    held.load_adapter(second, adapter_name="b")
    assert set(held.peft_config) == {"a", "b"}


def test_transformers_generate_reuses_the_prompt_s_sequence_decision_with_a_cache(tmp_path):
    # transformers' own generate (a load_adapter model) gives its cached steps no 2-D mask: each new token was
    # routed alone instead of with its prompt's decision
    folder = trained_bundle(tmp_path, routing_level="sequence")
    model = make_model("llama").eval()
    model.load_adapter(folder)
    reference = PeftModel.from_pretrained(make_model("llama"), folder).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids=ids, **options), reference.generate(input_ids=ids, **options))


def test_frozen_experts_stay_frozen_when_transformers_loads_them_trainable(tmp_path):
    # transformers sets each loaded tensor as a new Parameter that requires grad: the frozen experts trained
    folder = trained_bundle(tmp_path, freeze_experts=True, init_weights=False)
    model = make_model("llama")
    model.load_adapter(folder, is_trainable=True)
    trainable = {name.split(".")[-3] for name, p in model.named_parameters() if p.requires_grad}
    want = PeftModel.from_pretrained(make_model("llama"), folder, is_trainable=True)
    assert trainable == {name.split(".")[-3] for name, p in want.named_parameters() if p.requires_grad}
    assert trainable == {"mope_router"}


def edit_bundle(folder, config=None, tensors=None) -> None:
    """Change a saved bundle's config keys (a dict merged in) or tensors (a function of the name -> tensor dict)."""
    if config is not None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        saved = load_file(path)
        tensors(saved)
        save_file(saved, path)


def with_nan(saved: dict) -> None:
    saved[next(key for key in saved if "lora_B" in key)].fill_(float("nan"))


# transformers' own load_adapter builds the config with PEFT (no header, no value checks, unknown keys dropped) and
# loads the tensors after the injection, where a failure left the adapter injected and a retry "already exists"
UNFIT_FOR_TRANSFORMERS = {
    "other rank": ({"config": {"r": 4}}, "does not fit this model: wrong shapes"),
    "nan": ({"tensors": with_nan}, r"NaN or inf values in base_model\.model\..*lora_B"),
    "unknown key": ({"config": {"top_kk": 2}}, "top_kk"),
}


@pytest.mark.parametrize(("edit", "wanted"), UNFIT_FOR_TRANSFORMERS.values(), ids=list(UNFIT_FOR_TRANSFORMERS))
@pytest.mark.parametrize("subfolder", ["", "inner"])
def test_transformers_load_adapter_refuses_an_unfit_bundle_and_changes_nothing(tmp_path, edit, wanted, subfolder):
    folder = tmp_path / subfolder
    trained_bundle(folder)
    edit_bundle(folder, **edit)
    model = make_model("llama")
    batch = make_batch("llama", pad=2)
    before = Snapshot.of(model, batch)
    options = {"adapter_kwargs": {"subfolder": subfolder}} if subfolder else {}
    with pytest.raises(ValueError, match=wanted):
        model.load_adapter(str(tmp_path), **options)
    before.assert_same(model, batch)
    assert not model._hf_peft_config_loaded
    good = trained_bundle(tmp_path / "good")
    model.load_adapter(good)  # a retry on the same model: it was "already exists" once the injection stayed
    want = no_grad_logits(PeftModel.from_pretrained(make_model("llama"), good), batch)
    torch.testing.assert_close(no_grad_logits(model, batch), want, rtol=0, atol=0)


OLD = Path(__file__).resolve().parents[1] / "bundles" / "old"
OLD_CASES = sorted(path for path in OLD.glob("*/*") if (path / "adapter_config.json").is_file())


@pytest.mark.parametrize("folder", OLD_CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_transformers_load_adapter_gives_an_old_bundle_s_saved_logits_or_refuses_it(folder):
    # a router schedule's step is the tuner's, outside the model's module tree: transformers dropped it (0.039 off);
    # a whole-FFN bundle whose keys hold the adapter name loaded without its experts
    config = json.loads((folder / "adapter_config.json").read_text())
    kind = config["base_model_type"]
    model = make_model(kind)
    batch = make_batch(kind, pad=2)
    batch.pop("labels")
    if folder.name == "ffn_block":
        before = Snapshot.of(model, batch)
        with pytest.raises(ValueError, match=r"hold their adapter's name .* Load this bundle with PeftModel"):
            model.load_adapter(str(folder))
        before.assert_same(model, batch)
        return
    model.load_adapter(str(folder))
    extra = {"mope_task_ids": torch.tensor([1, 2])} if config["routing_level"] == "task" else {}
    with torch.no_grad():
        got = model.eval()(**batch, **extra).logits
    torch.testing.assert_close(got, load_file(folder / "logits.safetensors")["logits"], rtol=1e-5, atol=1e-6)


def test_the_router_schedule_of_a_load_adapter_model_steps(tmp_path):
    # step_schedule (so ScheduleCallback, MoPETrainer) looked for the tuner in a PeftModel only: "needs a MoPE model"
    folder = trained_bundle(
        tmp_path, router_schedule_steps=4, router_schedule_counter="manual", router_schedule_start_temperature=4.0
    )
    model = make_model("llama")
    model.load_adapter(folder, is_trainable=True)
    (tuner,) = {hook.__self__ for hook in model._forward_pre_hooks.values() if hasattr(hook, "__self__")}
    schedule = tuner.mope_schedule["default"]
    before = schedule.count
    mope.step_schedule(model)
    mope.ScheduleCallback().on_step_end(None, None, None, model=model)
    assert schedule.count == before + 2
    with pytest.raises(ValueError, match="needs a MoPE model"):
        mope.step_schedule(make_model("llama"))


def test_a_subfolder_and_an_explicit_config_are_read_as_transformers_reads_them(tmp_path):
    # from_pretrained(root, subfolder=...) puts it in the load config, not adapter_kwargs: the root was read (its
    # config, or "Can't find adapter_config.json"); an explicit peft_config= kept a link to the bundle for good
    import transformers

    make_model("llama").save_pretrained(tmp_path / "root" / "sub")
    folder = trained_bundle(tmp_path / "root" / "sub")
    edit_bundle(tmp_path / "root" / "sub", config={"base_model_name_or_path": str(tmp_path / "root")})
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "root", subfolder="sub")
    batch = make_batch("llama", pad=2)
    want = no_grad_logits(PeftModel.from_pretrained(make_model("llama"), folder), batch)
    torch.testing.assert_close(no_grad_logits(loaded, batch), want, rtol=0, atol=0)
    config = mope.MoPEConfig.from_pretrained(folder)
    config.bundle = None  # as a config made in code
    make_model("llama").load_adapter(folder, peft_config=config)
    assert config.bundle is None
