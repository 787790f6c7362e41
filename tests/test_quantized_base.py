"""Quantized frozen bases (mope.base_layers): MoPE on a tiny Llama loaded with bitsandbytes 4-bit (nf4 / fp4,
double quant) and 8-bit, on CPU: starts at the quantized base, trains, saves and reloads onto a freshly quantized
base with identical logits; folding dequantizes, re-quantizes and unfolds exactly; the collapse to a PEFT LoRA
still loads; quantized layer types mope cannot wrap are named before anything is attached.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import Snapshot, make_batch, make_model
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

import mope
from mope.base_layers import BNB_4BIT, BNB_8BIT, base_layer_type, read_bnb_4bit

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings(
    "ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning",
    "ignore:MatMul8bitLt:UserWarning",
    "ignore:.*quantiz:UserWarning",
    "ignore:.*bitsandbytes:UserWarning",
)

QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_model("llama").save_pretrained(folder)
    return folder


def quantized_llama(folder, kind: str, compute_dtype: torch.dtype = torch.float32):
    """The tiny Llama as transformers loads it with a BitsAndBytesConfig (deterministic: same weights each call)."""
    options = dict(QUANTIZATIONS[kind])
    if "load_in_4bit" in options:
        options["bnb_4bit_compute_dtype"] = compute_dtype
    config = transformers.BitsAndBytesConfig(**options)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def mope_config(**overrides) -> mope.MoPEConfig:
    kwargs = {"task_type": "CAUSAL_LM", "target_modules": TARGETS, "num_experts": 4, "top_k": 2, "r": 4}
    return mope.MoPEConfig(**{**kwargs, **overrides})


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def packed(model) -> list[torch.Tensor]:
    """The frozen quantized weights as stored (uint8 blocks or int8 rows), in module order."""
    return [p.detach().clone() for p in model.parameters() if p.dtype in (torch.uint8, torch.int8)]


def same(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> bool:
    return len(tensors) == len(others) and all(torch.equal(a, b) for a, b in zip(tensors, others, strict=True))


def train_steps(model, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        out = model(**make_batch("llama", pad=2, seed=10 + step))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


GRID = [(q, r, e) for q in ("nf4", "int8") for r in ("top_k", "dense") for e in ("lora", "adapter")]


@pytest.mark.parametrize(("kind", "router", "expert_type"), [*GRID, ("fp4", "top_k", "lora")])
def test_starts_at_the_quantized_base_trains_and_reloads_identically(llama_folder, tmp_path, kind, router, expert_type):
    base = quantized_llama(llama_folder, kind)
    batch = make_batch("llama", pad=2)
    want_base, frozen = logits(base, batch), packed(base)
    torch.manual_seed(0)
    model = get_peft_model(base, mope_config(router=router, expert_type=expert_type))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, mope.MoPELayer)
    assert base_layer_type(layer.base_layer) is (BNB_8BIT if kind == "int8" else BNB_4BIT)
    torch.testing.assert_close(logits(model, batch), want_base, rtol=0, atol=0)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("mope_router" in n for n in before) and any("mope_experts" in n for n in before)
    train_steps(model)
    after = dict(model.named_parameters())
    for part in ("mope_router", "lora_B" if expert_type == "lora" else ".up"):
        assert any(part in n and not torch.equal(after[n], v) for n, v in before.items()), f"{part} did not train"
    assert same(packed(model), frozen)
    trained = logits(model, batch)
    assert not torch.equal(trained, want_base)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_llama(llama_folder, kind), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "mlp"]], ids=["projections", "whole-ffn"])
def test_experts_and_routers_in_fp32_or_the_4bit_compute_dtype(llama_folder, compute_dtype, autocast, targets):
    """PEFT's choice: fp32 adapters by default; ``autocast_adapter_dtype=False`` keeps the base's compute dtype
    (whole-FFN experts take their block's down projection's: they stayed fp32)."""
    model = get_peft_model(
        quantized_llama(llama_folder, "nf4", compute_dtype),
        mope_config(target_modules=targets),
        autocast_adapter_dtype=autocast,
    )
    want = torch.float32 if autocast else compute_dtype
    assert {p.dtype for n, p in model.named_parameters() if "mope_" in n} == {want}
    model.train()
    out = model(**make_batch("llama", pad=2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "mope_router" in n)


def kbit_gradients(folder, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    base = prepare_model_for_kbit_training(
        quantized_llama(folder, "nf4"),
        use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    assert base.is_gradient_checkpointing == checkpointing
    torch.manual_seed(0)
    model = get_peft_model(base, mope_config(num_experts=8, init_weights=False))
    model.train()
    out = model(**make_batch("llama", pad=2))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_prepare_model_for_kbit_training_with_gradient_checkpointing_gives_the_same_gradients(llama_folder):
    loss, grads = kbit_gradients(llama_folder, checkpointing=False)
    loss_gc, grads_gc = kbit_gradients(llama_folder, checkpointing=True)
    assert grads.keys() == grads_gc.keys() and any("mope_router" in n for n in grads)
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, rtol=1e-6, atol=1e-8, msg=name)


def dequantized(layer) -> torch.Tensor:
    """The base's weight dequantized by PEFT's helper (as PEFT's own LoRA merge reads it)."""
    base = layer.get_base_layer()
    state = base.state if isinstance(base, bnb.nn.Linear8bitLt) else base.weight.quant_state
    return dequantize_bnb_weight(base.weight, state=state).clone()


def requantized(kind: str, weight: torch.Tensor, like) -> torch.Tensor:
    """``weight`` quantized by bitsandbytes' functions with the layer's settings, then dequantized."""
    if kind == "int8":
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.half())
        return bnb.functional.int8_vectorwise_dequant(codes, scales)
    # the parameter's settings, not its quant_state's: on an AVX-512 CPU bitsandbytes repacks the weight at the
    # first forward (packing_format_for_cpu), and the repacked state no longer says it was double-quantized
    param = like.weight
    data, new_state = bnb.functional.quantize_4bit(
        weight, blocksize=param.blocksize, compress_statistics=param.compress_statistics, quant_type=param.quant_type
    )
    return bnb.functional.dequantize_4bit(data, new_state)


@pytest.mark.parametrize("expert_type", ["lora", "ia3"])
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_folding_requantizes_the_dense_sum_and_unfolding_restores_the_base_exactly(llama_folder, kind, expert_type):
    """Before: nf4/fp4 raised 'size of tensor a (2048) must match ... (64)'; int8 silently copied float into int8."""
    torch.manual_seed(0)
    model = get_peft_model(quantized_llama(llama_folder, kind), mope_config(num_experts=1, top_k=1, init_weights=False))
    model.eval()
    batch = make_batch("llama", pad=2)
    layers = [m for m in model.modules() if isinstance(m, mope.MoPELayer)]
    gate = torch.ones(1)
    frozen = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    want = {}  # read before any forward: an inference forward on CPU repacks 4-bit codes (see below)
    for layer in layers:
        w, bank = dequantized(layer), layer.mope_experts["default"]
        want[layer.module_name] = requantized(kind, bank.fold_into(w, None, gate)[0], layer.get_base_layer())

    model.merge_adapter()
    for layer in layers:
        assert base_layer_type(layer.get_base_layer()) is (BNB_8BIT if kind == "int8" else BNB_4BIT)
        torch.testing.assert_close(dequantized(layer), want[layer.module_name], rtol=0, atol=0)
    folded = logits(model, batch)

    model.unmerge_adapter()
    assert same([layer.get_base_layer().weight for layer in layers], frozen)  # the kept originals, exactly

    plain = model.merge_and_unload()
    assert not any(isinstance(m, mope.MoPELayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), folded, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_the_fold_reads_a_4bit_weight_that_an_inference_forward_repacked(llama_folder, kind):
    # on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit codes for its CPU kernel on the first inference
    # forward; the fold read them as standard ones (0.13 off where the largest entry is 0.07; merged logits 0.34
    # off): QLoRA's train, evaluate, merge_and_unload
    model = get_peft_model(quantized_llama(llama_folder, kind), mope_config(num_experts=1, top_k=1))
    layers = [m for m in model.modules() if isinstance(m, mope.MoPELayer)]
    before = [dequantized(layer) for layer in layers]
    logits(model.eval(), make_batch("llama", pad=2))
    repacked = [getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False) for layer in layers]
    for layer, want in zip(layers, before, strict=True):  # the codes come back exactly, the block scales from bf16
        torch.testing.assert_close(read_bnb_4bit(layer.get_base_layer()), want, rtol=1e-2, atol=1e-6)
    if not any(repacked):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes kept the standard layout (the reads above still held)")


def test_export_lora_from_a_4bit_base_loads_as_a_peft_lora_on_a_fresh_4bit_base(llama_folder, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        quantized_llama(llama_folder, "nf4"), mope_config(num_experts=1, top_k=1, init_weights=False)
    )
    model.eval()
    batch = make_batch("llama", pad=2)
    mope.export_lora(model, tmp_path, method="concat")
    lora = PeftModel.from_pretrained(quantized_llama(llama_folder, "nf4"), tmp_path)
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    torch.testing.assert_close(logits(lora, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


def test_whole_ffn_experts_on_a_4bit_mlp_train_and_reload(llama_folder, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(quantized_llama(llama_folder, "nf4"), mope_config(target_modules=["mlp"]))
    assert isinstance(model.base_model.model.model.layers[0].mlp, mope.ffn_layer.MoPEFFNLayer)
    train_steps(model)
    batch = make_batch("llama", pad=2)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_llama(llama_folder, "nf4"), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


# --- quantized layer types mope cannot wrap: named, nothing attached -------------------------------------------


class QuantLinear(nn.Module):
    """Stands for GPTQ's QuantLinear (not an nn.Linear): packed int32 weights and a dense forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.infeatures, self.outfeatures = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(linear.in_features // 8, linear.out_features, dtype=torch.int32))
        self.dense = linear.weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dense.T


class HQQLinear(QuantLinear):
    pass


class AffineQuantizedTensor(torch.Tensor):
    """Stands for a torchao weight: a tensor subclass on a plain nn.Linear."""


class Int8Linear(nn.Linear):
    """An nn.Linear subclass of an unknown library whose weight holds int8 codes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(linear.weight.detach().round().to(torch.int8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.float().T


QuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda_old"
HQQLinear.__module__ = "hqq.core.quantize"
AffineQuantizedTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"


def torchao_linear(linear: nn.Linear) -> nn.Linear:
    linear.weight = nn.Parameter(linear.weight.detach().as_subclass(AffineQuantizedTensor), requires_grad=False)
    return linear


UNSUPPORTED = {
    "gptq": (
        QuantLinear,
        r"'model\.layers\.1\.self_attn\.v_proj' is a GPTQ \(auto-gptq\) quantized layer \(auto_gptq\.",
    ),
    "hqq": (
        HQQLinear,
        r"'model\.layers\.1\.self_attn\.v_proj' is a HQQ quantized layer \(hqq\.core\.quantize\.HQQLinear",
    ),
    "torchao": (torchao_linear, r"'model\.layers\.1\.self_attn\.v_proj' is a torchao quantized layer \(torch\.nn"),
    "int8_linear": (Int8Linear, r"'model\.layers\.1\.self_attn\.v_proj' is a .*Int8Linear whose weight is torch\.int8"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_quantized_type_mope_cannot_wrap_is_named_and_the_model_is_unchanged(name):
    """The unsupported layer sits in layer 1: layer 0's modules were wrapped first, and are unwrapped again."""
    make, message = UNSUPPORTED[name]
    model = make_model("llama")
    attention = model.model.layers[1].self_attn
    attention.v_proj = make(attention.v_proj)
    batch = make_batch("llama", pad=2)
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=message) as caught:
        get_peft_model(model, mope_config(target_modules=["q_proj", "v_proj"]))
    assert "bitsandbytes" in str(caught.value) and "target_modules" in str(caught.value)
    before.assert_same(model, batch)


def test_a_gated_mlp_with_an_unsupported_projection_names_the_projection():
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.down_proj = QuantLinear(mlp.down_proj)
    batch = make_batch("llama", pad=2)
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj' is a GPTQ \(auto-gptq\) quantized layer"):
        get_peft_model(model, mope_config(target_modules=["mlp"]))
    before.assert_same(model, batch)


def test_all_linear_names_the_quantized_layers_it_would_leave_out():
    """PEFT's 'all-linear' picks nn.Linear / Conv1D only: GPTQ-style layers were skipped without a word."""
    model = make_model("llama")
    for layer in model.model.layers:
        layer.self_attn.v_proj = QuantLinear(layer.self_attn.v_proj)
    batch = make_batch("llama", pad=2)
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError, match=r"'all-linear' would leave out 2 GPTQ \(auto-gptq\) quantized layers"):
        get_peft_model(model, mope_config(target_modules="all-linear"))
    before.assert_same(model, batch)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_wrapping_and_a_merge_after_an_inference_forward_leave_the_4bit_codes_as_they_were(llama_folder, kind):
    # the whole-FFN check ran the block in eval, and bitsandbytes repacked its codes for its CPU kernel: training then
    # took other gradients and a save unpacked them lossily; a fold's read rewrote the codes the layer kept for
    # unmerge (double-quantized scales re-quantized: 1.3e-3 off after merge and unmerge)
    base = quantized_llama(llama_folder, kind)
    codes = packed(base)
    model = get_peft_model(
        base, mope_config(target_modules=["q_proj", "mlp"], num_experts=1, top_k=1, init_weights=False)
    )
    assert same(packed(model), codes)
    batch = make_batch("llama", pad=2)
    want = logits(model.eval(), batch)
    folded = get_peft_model(
        quantized_llama(llama_folder, kind), mope_config(num_experts=1, top_k=1, init_weights=False)
    )
    before = logits(folded.eval(), batch)  # an inference forward: the codes may be repacked now
    folded.merge_adapter()
    folded.unmerge_adapter()
    torch.testing.assert_close(logits(folded, batch), before, rtol=0, atol=0)
    assert want.isfinite().all()


def test_experts_load_on_an_8bit_base_with_low_cpu_mem_usage(llama_folder, tmp_path):
    # PEFT's module swap moved the whole layer, experts still on meta included: "Cannot copy out of meta tensor"
    model = get_peft_model(quantized_llama(llama_folder, "int8"), mope_config(init_weights=False))
    model.save_pretrained(tmp_path)
    batch = make_batch("llama")
    loaded = PeftModel.from_pretrained(quantized_llama(llama_folder, "int8"), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded.eval(), batch), logits(model.eval(), batch), rtol=0, atol=0)
    get_peft_model(quantized_llama(llama_folder, "int8"), mope_config(), low_cpu_mem_usage=True)
