"""``model.quantization`` in recipes (issue 17, item 1): the loop trains a MoPE mixture on a tiny Llama quantized
by bitsandbytes on CPU, its bundle reloads onto a freshly quantized base with identical logits, and bad values
(or a missing bitsandbytes) are refused naming the field before anything is built.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import make_batch
from peft import PeftModel
from torch import nn

import mope
from mope.training.launch import checked_recipe
from mope.training.loop import Run
from mope.training.models import build_model, wrap
from mope.training.recipe import RecipeError, load_recipe

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt:UserWarning", "ignore:.*quantiz:UserWarning", "ignore:.*bitsandbytes:UserWarning"
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"
QUICK = ["training.max_steps=4", "training.save_every=null", "data.max_examples=40", "training.log_every=1"]
NF4 = "model.quantization={bits: 4, quant_type: nf4, double_quant: true, compute_dtype: float32}"
INT8 = "model.quantization={bits: 8}"


def recipe(out: Path, *overrides: str):
    return load_recipe(TINY, [*QUICK, f"training.output_dir={out}", *overrides])


def logits(model) -> torch.Tensor:
    batch = make_batch("llama", pad=2)
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def packed(model) -> list[torch.Tensor]:
    """The frozen quantized weights (uint8 blocks or int8 rows) in bitsandbytes' saved layout, in module order.

    On a CPU with AVX-512 BF16 bitsandbytes repacks a 4-bit weight into its own layout at the first forward
    without gradients (an eval pass) and puts it back when saving; saving is not exact (the double
    quantization is redone), so the layout is put back here on copies, with bitsandbytes' own inverse.
    """
    weights = []
    for p in model.parameters():
        if p.dtype not in QUANTIZED:
            continue
        state = getattr(p, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weights.append(_convert_weight_packed_for_cpu_inverse(p.detach().clone(), copy.deepcopy(state))[0])
        else:
            weights.append(p.detach().clone())
    return weights


QUANTIZED = (torch.uint8, torch.int8)


@pytest.mark.parametrize(("quantization", "layer_type"), [(NF4, "Linear4bit"), (INT8, "Linear8bitLt")])
def test_a_quantized_recipe_trains_and_its_bundle_reloads_onto_a_freshly_quantized_base(
    tmp_path, quantization, layer_type
):
    AcceleratorState._reset_state()
    job = Run(recipe(tmp_path, quantization))
    job.setup()
    model = job.accelerator.unwrap_model(job.model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, mope.MoPELayer) and type(q_proj.get_base_layer()).__name__ == layer_type
    if layer_type == "Linear4bit":
        state = q_proj.get_base_layer().weight.quant_state
        assert (state.quant_type, state.nested) == ("nf4", True)
    frozen = packed(model)
    assert frozen and not any(p.requires_grad for p in model.parameters() if p.dtype in QUANTIZED)

    job.finish(job.train())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(packed(model), frozen, strict=True))  # the base did not train

    assert json.loads((tmp_path / "bundle" / "adapter_config.json").read_text())["base_model_name_or_path"] in (
        "",
        None,
    )
    fresh = build_model(job.recipe.model, None, job.recipe.training.seed)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "bundle")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    AcceleratorState._reset_state()


def batch_gradients(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The adapter's gradients from one batch of the run's own loader."""
    AcceleratorState._reset_state()
    job = Run(recipe(out, NF4, "adapter.config.init_weights=false", *overrides))
    job.setup()
    job.model.train()
    job.model(**next(iter(job.train_loader))).loss.backward()
    AcceleratorState._reset_state()
    return {n: p.grad for n, p in job.model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_on_a_quantized_base_gives_the_routers_the_same_gradients(tmp_path):
    """prepare_model_for_kbit_training's default checkpointing is reentrant: the router losses would not reach
    the routers. The recipe's is the non-reentrant kind, so the gradients equal those without checkpointing."""
    plain = batch_gradients(tmp_path / "plain")
    checkpointed = batch_gradients(tmp_path / "checkpointed", "training.gradient_checkpointing=true")
    assert plain.keys() == checkpointed.keys() and any("mope_router" in n for n in plain)
    for name, grad in plain.items():
        assert grad is not None and checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_an_evaluation_between_training_steps_leaves_every_expert_a_gradient(tmp_path):
    """bitsandbytes repacked a 4-bit weight in an eval-mode no-grad forward (CPUs with AVX-512 BF16), and training
    forwards through that frozen layer passed no gradient on: q_proj's and v_proj's experts (before o_proj) stopped
    training. The loop's base keeps one layout (this check bites only on such a CPU)."""
    AcceleratorState._reset_state()
    targets = "adapter.config.target_modules=[q_proj, v_proj]"  # their outputs reach the loss through o_proj
    job = Run(recipe(tmp_path, NF4, "adapter.config.init_weights=false", targets))
    job.setup()
    assert all(not m.support_avx512bf16_for_cpu for m in job.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    job.evaluate()
    job.model.train()
    job.model(**next(iter(job.train_loader))).loss.backward()
    AcceleratorState._reset_state()
    missing = [n for n, p in job.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and any("q_proj.mope_experts" in n for n, p in job.model.named_parameters() if p.requires_grad)


def test_a_quantized_classifier_keeps_its_head_unquantized_and_trains(tmp_path):
    """PEFT trains the SEQ_CLS head whole (modules_to_save); a 4-bit copy of it failed in bitsandbytes' forward."""
    section = recipe(tmp_path, NF4, "model.task=sequence_classification").model
    base = build_model(section, 3, 0)
    base.config.pad_token_id = 0  # as the loop sets it from the tokenizer
    assert type(base.score) is nn.Linear and base.score.weight.dtype == torch.float32
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = wrap(base, load_recipe(TINY).adapter, "sequence_classification")
    model.train()
    batch = make_batch("llama")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.base_model.model.score.modules_to_save["default"].weight.grad is not None


BAD = {
    "model.quantization={bits: 3}": r"model\.quantization\.bits: Input should be 4 or 8",
    "model.quantization={bits: 4, quant_type: int4}": r"model\.quantization\.quant_type: Input should be 'nf4' or 'fp4'",
    "model.quantization={bits: 4, compute_dtype: fp8}": r"model\.quantization\.compute_dtype: Input should be",
    "model.quantization={bits: 4, double_quant: maybe}": r"model\.quantization\.double_quant: Input should be a valid",
    "model.quantization={bits: 8, quant_type: nf4}": r"model\.quantization: quant_type applies to bits: 4 only",
    "model.quantization={quant_type: nf4}": r"model\.quantization\.bits: Field required",
    "model.quantization={bits: 4, nf4: true}": r"model\.quantization\.nf4: Extra inputs are not permitted",
}


@pytest.mark.parametrize("override", BAD)
def test_a_bad_quantization_value_is_refused_naming_the_field(override):
    with pytest.raises(RecipeError, match=BAD[override]):
        checked_recipe(TINY, [override])


def test_quantization_defaults_and_checked_recipe():
    assert load_recipe(TINY).model.quantization is None
    quantization = checked_recipe(TINY, ["model.quantization={bits: 4}"]).model.quantization
    assert quantization.model_dump() == {
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "float32",
    }
    assert checked_recipe(TINY, [INT8]).model.quantization.bits == 8


@pytest.mark.parametrize(
    ("installed", "words"),
    [
        (None, "needs bitsandbytes, which is not installed: pip install 'mope[quant]'"),
        ("0.44.1", ">= 0.50, found 0.44.1"),
    ],
)
def test_bitsandbytes_missing_or_too_old_is_named_with_the_install_command(monkeypatch, installed, words):
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name != "bitsandbytes":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(RecipeError, match=r"^model\.quantization needs bitsandbytes") as error:
        checked_recipe(TINY, [NF4])
    assert words in str(error.value)
    with pytest.raises(RecipeError, match=r"^model\.quantization needs bitsandbytes"):  # mope.train's own path
        build_model(load_recipe(TINY, [NF4]).model, None, 0)
    checked_recipe(TINY)  # without quantization bitsandbytes is not needed


@pytest.mark.slow
def test_compiled_training_on_a_4bit_base_gives_the_eager_losses(tmp_path):
    """training.compile with a 4-bit base: inductor compiles bitsandbytes' CPU ops (about 100 s on 2 cores)."""
    fixed = ["data.max_length=8", "training.batch_size=4", "data.max_examples=20"]  # one shape: one compile
    runs = {}
    for name, extra in {"eager": [], "compiled": ["training.compile=true"]}.items():
        AcceleratorState._reset_state()
        job = Run(recipe(tmp_path / name, NF4, *fixed, *extra))
        job.setup()
        job.finish(job.train())
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    AcceleratorState._reset_state()
    assert len(runs["compiled"]) == 4
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=1e-4, rel=0)
