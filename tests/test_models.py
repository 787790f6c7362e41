"""MoPE on real (tiny) Hugging Face models: a table of (model, config) through one battery, plus PEFT integration.

The battery checks, for every row: identity at init, which parameters train, that training
lowers the loss with ``loss = task loss + aux_loss``, and that the base weights never move.
The other tests cover what PEFT users rely on: trainable-parameter counts, ``disable_adapter``,
several named adapters, ``modules_to_save``, gradient checkpointing, loading (in this process
and in a fresh one), ``transformers.Trainer`` checkpoints and bf16 models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import MODELS, assert_round_trip, make_batch, make_model
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

import mope
from mope import MoPEConfig, MoPELayer, Router

TESTS_DIR = Path(__file__).resolve().parent
COMMON = {"target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4}


def config_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """MoPEConfig kwargs for model ``name``: the task type its head needs, the common sizes, overrides."""
    return {"task_type": MODELS[name][1], **COMMON, **overrides}


def mope_config(name: str, **overrides: Any) -> MoPEConfig:
    return MoPEConfig(**config_kwargs(name, **overrides))


# (model name, MoPEConfig kwargs): every row goes through `test_battery`.
TABLE: list[tuple[str, dict[str, Any]]] = [
    *[
        (name, config_kwargs(name, router=router))
        for name in ("llama", "gpt2", "bert", "t5")
        for router in ("top_k", "dense")
    ],
    ("llama", config_kwargs("llama", num_experts=8, top_k=3)),
    ("gpt2", config_kwargs("gpt2", lora_dropout=0.1, router_jitter=0.1)),
    ("t5", config_kwargs("t5", target_modules=None)),  # PEFT's default LoRA targets for T5 (q, v)
]


def row_id(row: tuple[str, dict[str, Any]]) -> str:
    name, kwargs = row
    shown = {k: v for k, v in kwargs.items() if k != "task_type" and COMMON.get(k, object()) != v}
    return name + "-" + "-".join(f"{k}={v}" for k, v in shown.items())


# --- task losses, recomputed from the logits independently of the model -------------------------------


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def plain_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each logit row against its label (seq2seq decoder tokens, sequence classes)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


TASK_LOSSES = {"llama": causal_lm_loss, "gpt2": causal_lm_loss, "bert": plain_ce_loss, "t5": plain_ce_loss}


# --- helpers ---------------------------------------------------------------------------------------------


def wrap(name: str, seed: int = 0, base: nn.Module | None = None, **overrides: Any) -> PeftModel:
    """A fresh tiny ``name`` model with a MoPE adapter; ``seed`` fixes the adapter's init."""
    base = make_model(name) if base is None else base
    torch.manual_seed(seed)
    return get_peft_model(base, mope_config(name, **overrides))


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.train(was_training)
    return logits


def train_steps(model: nn.Module, batch: dict, steps: int, lr: float = 5e-3) -> list[Any]:
    """AdamW on one fixed batch; returns each step's output (computed before that step's update)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    outputs = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        outputs.append(out)
    model.eval()
    return outputs


def is_adapter_parameter(name: str) -> bool:
    return "mope_" in name or "modules_to_save" in name


def mope_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "mope_" in n and p.grad is not None}


def linear_shapes(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[int, int]]:
    """(d_in, d_out) of every Linear/Conv1D that 'all-linear' targets (not the output head)."""
    shapes = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in skip:
            continue
        if isinstance(module, nn.Linear):
            shapes.append((module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            shapes.append(tuple(module.weight.shape))  # Conv1D stores [d_in, d_out]
    return shapes


def saved_tensor_names(folder: Path) -> list[str]:
    with safe_open(str(folder / SAFETENSORS_WEIGHTS_NAME), framework="pt") as handle:
        return list(handle.keys())


# --- the battery -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", TABLE, ids=[row_id(row) for row in TABLE])
def test_battery(row: tuple[str, dict[str, Any]]) -> None:
    name, kwargs = row
    base = make_model(name)
    batch = make_batch(name, pad=2)
    base_logits = logits_of(base, batch)
    originals = {id(p): (n, p, p.detach().clone()) for n, p in base.named_parameters()}

    torch.manual_seed(0)
    model = get_peft_model(base, MoPEConfig(**kwargs))
    layers = [m for m in model.modules() if isinstance(m, MoPELayer)]
    assert layers, "no module got experts"

    # a. init_weights=True: the wrapped model is exactly the base model.
    assert torch.equal(logits_of(model, batch), base_logits)

    # b. Only experts and routers train (plus the classification head PEFT adds to modules_to_save).
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(is_adapter_parameter(n) for n in trainable), sorted(n for n in trainable if not is_adapter_parameter(n))
    assert all("mope_" not in n and "modules_to_save" not in n for n in frozen)
    for layer in layers:  # every adapted module has its own experts and router
        assert list(layer.mope_experts.parameters()) and list(layer.mope_router.parameters())
    assert any("modules_to_save" in n for n in trainable) == (name == "bert")

    # c. Training on one batch lowers the loss; loss = task loss + aux_loss, aux_loss finite and > 0.
    outputs = train_steps(model, batch, steps=30)
    first, last = outputs[0].loss.item(), outputs[-1].loss.item()
    assert last < 0.8 * first, f"loss {first:.4f} -> {last:.4f}"
    for out in (outputs[0], outputs[-1]):
        aux = out.get("aux_loss")
        assert aux is not None and aux.dim() == 0
        assert torch.isfinite(aux) and aux.item() > 0
        task_loss = TASK_LOSSES[name](out.logits.detach(), batch["labels"])
        torch.testing.assert_close(out.loss.detach() - aux.detach(), task_loss, rtol=1e-5, atol=1e-6)

    # d. The base weights are bit-identical, and they are still the weights the model uses.
    for _name, parameter, before in originals.values():
        assert torch.equal(parameter, before), _name
    for n, p in model.named_parameters():
        assert is_adapter_parameter(n) or id(p) in originals, n


# --- PEFT integration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_trainable_parameter_count_matches_hand_count(name: str, capsys: pytest.CaptureFixture) -> None:
    n, r = COMMON["num_experts"], COMMON["r"]
    shapes = linear_shapes(make_model(name))
    expected = sum(n * r * (d_in + d_out) + n * d_in for d_in, d_out in shapes)  # experts + router
    model = wrap(name)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in make_model(name).parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_disable_adapter_gives_base_logits_after_training() -> None:
    batch = make_batch("llama", pad=2)
    base_logits = logits_of(make_model("llama"), batch)
    model = wrap("llama")
    train_steps(model, batch, steps=3)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, batch), base_logits)
    assert not torch.allclose(logits_of(model, batch), base_logits, atol=1e-4)


def test_several_named_adapters_switch_delete_save_and_load(tmp_path: Path) -> None:
    batch = make_batch("llama", pad=2)
    model = wrap("llama", init_weights=False)
    default_logits = logits_of(model, batch)

    torch.manual_seed(1)
    model.add_adapter("second", mope_config("llama", init_weights=False, router="dense"))
    assert torch.equal(logits_of(model, batch), default_logits)  # adding does not activate
    model.set_adapter("second")
    second_logits = logits_of(model, batch)
    assert not torch.allclose(second_logits, default_logits, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".second" in n for n in trainable)
    model.set_adapter("default")
    assert torch.equal(logits_of(model, batch), default_logits)

    mope.save_pretrained(model, tmp_path)  # PEFT 0.19's model.save_pretrained puts both adapters in each file
    assert (tmp_path / SAFETENSORS_WEIGHTS_NAME).is_file()
    assert (tmp_path / "second" / SAFETENSORS_WEIGHTS_NAME).is_file()
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert torch.equal(logits_of(loaded, batch), default_logits)
    loaded.set_adapter("second")
    assert torch.equal(logits_of(loaded, batch), second_logits)

    model.delete_adapter("second")
    assert "second" not in model.peft_config
    assert not any(".second" in n for n, _ in model.named_parameters())
    assert torch.equal(logits_of(model, batch), default_logits)


def test_modules_to_save_lm_head_is_trained_saved_and_restored(tmp_path: Path) -> None:
    batch = make_batch("llama", pad=2)
    model = wrap("llama", modules_to_save=["lm_head"])
    head = model.base_model.model.lm_head
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    train_steps(model, batch, steps=3)
    trained_head = head.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained_head, head.original_module.weight)
    logits = logits_of(model, batch)

    model.save_pretrained(tmp_path)
    head_keys = [k for k in saved_tensor_names(tmp_path) if "lm_head" in k]
    assert head_keys, "lm_head is missing from the bundle"
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, trained_head)
    assert torch.equal(logits_of(loaded, batch), logits)


def checkpointing_run(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], int]:
    """Two forward+backward passes; returns mope gradients, the aux losses, and one layer's forward count."""
    base = make_model("llama")
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap("llama", base=base, init_weights=False)
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    batch = make_batch("llama", pad=2)
    aux_losses = []
    for _ in range(2):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        aux_losses.append(out.aux_loss.detach())
    return mope_gradients(model), aux_losses, len(calls)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_same_gradients_and_counts_aux_loss_once() -> None:
    plain_grads, plain_aux, plain_calls = checkpointing_run(checkpointing=False)
    ckpt_grads, ckpt_aux, ckpt_calls = checkpointing_run(checkpointing=True)
    assert ckpt_calls == 2 * plain_calls  # the layers really were recomputed in the backward pass
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for key, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[key], grad, atol=1e-5, rtol=1e-5), key
    for aux, reference in zip(ckpt_aux, plain_aux, strict=True):
        torch.testing.assert_close(aux, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ckpt_aux[1], ckpt_aux[0])  # recomputation left nothing behind


def test_from_pretrained_trainability_and_config_round_trip(tmp_path: Path) -> None:
    model = wrap("llama", init_weights=False, router="dense", aux_loss_coef=0.02)
    model.save_pretrained(tmp_path)

    trainable = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    mope_params = [p for n, p in trainable.named_parameters() if "mope_" in n]
    assert mope_params and all(p.requires_grad for p in mope_params)
    frozen = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())

    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoPEConfig)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    expected = dataclasses.replace(model.peft_config["default"], inference_mode=saved["inference_mode"])
    for field in dataclasses.fields(MoPEConfig):
        assert getattr(loaded, field.name) == getattr(expected, field.name), field.name


def test_trainer_saves_adapter_only_checkpoints_that_load_back(tmp_path: Path) -> None:
    rows = make_batch("llama", batch=4, pad=2)
    dataset = [{key: value[i] for key, value in rows.items()} for i in range(4)]
    model = wrap("llama")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=1,
        save_strategy="steps",
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_strategy="no",
    )
    transformers.Trainer(model=model, args=args, train_dataset=dataset).train()

    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        files = set(os.listdir(folder))
        assert {SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    batch = make_batch("llama", pad=2)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "checkpoint-2")
    trained_logits = logits_of(model, batch)
    assert torch.allclose(logits_of(loaded, batch), trained_logits, atol=1e-6)
    assert not torch.allclose(trained_logits, logits_of(make_model("llama"), batch), atol=1e-4)


def test_bf16_model_keeps_fp32_experts_and_router_math() -> None:
    base = make_model("llama").to(torch.bfloat16)
    model = wrap("llama", base=base, init_weights=False)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if "mope_" in name else torch.bfloat16), name
    routings = []
    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda _m, _a, routing: routings.append(routing))
    model.train()
    out = model(**make_batch("llama", pad=2))
    assert out.logits.dtype == torch.bfloat16
    assert routings and all(t.dtype == torch.float32 for r in routings for t in (r.weights, r.probs, r.logits, r.load))
    assert torch.isfinite(out.aux_loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "mope_" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


LOAD_IN_NEW_PROCESS = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from conftest import make_batch, make_model
    from peft import PeftModel
    from safetensors.torch import save_file

    model = PeftModel.from_pretrained(make_model("llama"), sys.argv[2])
    model.eval()
    with torch.no_grad():
        logits = model(**make_batch("llama", pad=2)).logits
    save_file({"logits": logits.contiguous()}, sys.argv[3])
    """
)


@pytest.mark.slow
def test_bundle_round_trips_through_a_new_process(tmp_path: Path) -> None:
    batch = make_batch("llama", pad=2)
    model = wrap("llama", init_weights=False)
    train_steps(model, batch, steps=2)
    logits = logits_of(model, batch)
    bundle = tmp_path / "bundle"
    model.save_pretrained(bundle)

    trainable, _ = model.get_nb_trainable_parameters()
    size = (bundle / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    assert abs(size - 4 * trainable) <= 0.1 * 4 * trainable, (size, trainable)
    assert all("mope_" in key or "modules_to_save" in key for key in saved_tensor_names(bundle))

    out_file = tmp_path / "logits.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", LOAD_IN_NEW_PROCESS, str(TESTS_DIR), str(bundle), str(out_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(load_file(str(out_file))["logits"], logits, atol=1e-6)


def test_lm_head_target_round_trips(tmp_path):
    """PEFT saves the targeted lm_head's base weight with the adapter; loading accepts that copy."""
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"], init_weights=False)
    model = get_peft_model(make_model("llama"), config)
    assert_round_trip(model, "llama", tmp_path / "bundle")


@pytest.mark.parametrize("router", ["top_k", "dense"])
def test_training_forward_traces_as_one_graph(router):
    """torch.compile (docs/speed.md's advice on a GPU) captures the whole training forward, router losses
    included, without a graph break: routing, dispatch and the deferred Routing fields all trace."""
    torch.manual_seed(0)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, r=2, router=router)
    model = get_peft_model(make_model("llama"), config).train()
    explained = torch._dynamo.explain(lambda batch: model(**batch).loss)(make_batch("llama"))
    assert explained.graph_break_count == 0, [str(reason.reason) for reason in explained.break_reasons]
    assert explained.graph_count == 1


def test_a_compiled_encoder_routes_its_pooler_as_eager_does():
    # compiled, every call counts as continuing a KV cache (the tuner cannot read the cache's length there): the
    # pooler's [batch, hidden] input was then taken for a decoding step, which expert choice refuses
    config = MoPEConfig(
        task_type="SEQ_CLS", target_modules="all-linear", num_experts=4, top_k=2, r=4, router="expert_choice",
        init_weights=False,
    )  # fmt: skip
    model = get_peft_model(make_model("bert"), config).eval()
    assert isinstance(model.base_model.model.bert.pooler.dense, MoPELayer)
    batch = make_batch("bert", pad=2)
    with torch.no_grad():
        eager = model(**batch).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
