"""The bad-input matrix: every wrong config, target or bundle raises a clear error and changes nothing.

Each case asserts the exception type, that its message names the problem (a config field, a
module, a file or a tensor), and that the model it was given is exactly as it was before:
same modules, weights, trainability, hooks, config and outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model
from torch import nn

import mope
from mope import MoPEConfig, MoPELayer

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# "the model is unchanged": a full snapshot and its comparison
# ---------------------------------------------------------------------------------------------


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.clone()


@dataclass
class Snapshot:
    """Everything a failed call could have changed on a model, captured by value."""

    modules: list[tuple[str, type]]
    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: list[tuple[str, bool]]
    hooks: list[tuple[str, int, int]]
    config: dict[str, Any] | None
    has_peft_config: bool
    peft_config_keys: list[str] | None
    logits: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, batch: dict) -> Snapshot:
        config = getattr(model, "config", None)
        peft_config = getattr(model, "peft_config", None)
        return cls(
            modules=[(name, type(module)) for name, module in model.named_modules()],
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
            training=[(name, module.training) for name, module in model.named_modules()],
            hooks=[(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
            config=config.to_dict() if config is not None and hasattr(config, "to_dict") else None,
            has_peft_config="peft_config" in vars(model),
            peft_config_keys=sorted(peft_config) if isinstance(peft_config, dict) else None,
            logits=logits_of(model, batch),
        )

    def assert_same(self, model: nn.Module, batch: dict) -> None:
        after = Snapshot.of(model, batch)
        assert after.modules == self.modules, "module names or types changed"
        assert after.state.keys() == self.state.keys(), "state_dict keys changed"
        for key, value in self.state.items():
            assert torch.equal(after.state[key], value), f"tensor {key} changed"
        assert after.requires_grad == self.requires_grad, "requires_grad flags changed"
        assert after.training == self.training, "train/eval modes changed"
        assert after.hooks == self.hooks, "forward hooks were added or removed"
        assert after.config == self.config, "model.config changed"
        assert after.has_peft_config == self.has_peft_config, "peft_config attribute added or removed"
        assert after.peft_config_keys == self.peft_config_keys, "adapters in peft_config changed"
        torch.testing.assert_close(after.logits, self.logits, rtol=0, atol=0)


def assert_plain(model: nn.Module) -> None:
    """No trace of MoPE left on a base model."""
    assert not any(isinstance(m, MoPELayer) for m in model.modules())
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())
    assert "peft_config" not in vars(model)


# ---------------------------------------------------------------------------------------------
# 1. invalid config fields
# ---------------------------------------------------------------------------------------------

BAD_FIELDS = [
    ("num_experts", {"num_experts": 0}, "MoPEConfig.num_experts"),
    ("top_k > num_experts", {"num_experts": 4, "top_k": 5}, "MoPEConfig.top_k"),
    ("top_k", {"top_k": 0}, "MoPEConfig.top_k"),
    ("r", {"r": 0}, "MoPEConfig.r"),
    ("r non-int", {"r": 1.5}, "MoPEConfig.r"),
    ("lora_alpha", {"lora_alpha": 0}, "MoPEConfig.lora_alpha"),
    ("lora_dropout", {"lora_dropout": 1.0}, "MoPEConfig.lora_dropout"),
    ("router", {"router": "nope"}, "MoPEConfig.router="),
    ("router_init", {"router_init": "nope"}, "MoPEConfig.router_init"),
    ("expert_type", {"expert_type": "nope"}, "MoPEConfig.expert_type"),
    ("aux_loss_coef", {"aux_loss_coef": -1}, "MoPEConfig.aux_loss_coef"),
    ("z_loss_coef", {"z_loss_coef": -1}, "MoPEConfig.z_loss_coef"),
    ("router_jitter", {"router_jitter": 1.5}, "MoPEConfig.router_jitter"),
    ("init_weights", {"init_weights": "yes"}, "MoPEConfig.init_weights"),
    ("target_parameters", {"target_parameters": ["x"]}, "MoPEConfig.target_parameters"),
    ("layers_pattern", {"layers_pattern": "layers"}, "MoPEConfig.layers_pattern"),
]


@pytest.mark.parametrize(("field", "kwargs", "substring"), BAD_FIELDS, ids=[row[0] for row in BAD_FIELDS])
def test_invalid_config_field(field: str, kwargs: dict, substring: str) -> None:
    model = make_model("llama")
    batch = make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", **kwargs))
    assert substring in str(info.value), f"{field}: {info.value}"
    before.assert_same(model, batch)
    assert_plain(model)


@pytest.mark.parametrize(
    "load",
    [MoPEConfig.from_pretrained, lambda path: mope.load_mope(make_model("llama"), path)],
    ids=["MoPEConfig.from_pretrained", "load_mope"],
)
def test_invalid_config_in_bundle_json(tmp_path: Path, llama_bundle: Path, load: Callable[[Path], Any]) -> None:
    """A hand-edited ``adapter_config.json`` is validated the same way as a config built in code."""
    bad = copy_bundle(llama_bundle, tmp_path)
    edit_config(bad, top_k=0)
    with pytest.raises(ValueError) as info:
        load(bad)
    assert "MoPEConfig.top_k" in str(info.value)


# ---------------------------------------------------------------------------------------------
# 2. / 3. targets that match nothing, or a module type that cannot carry experts
# ---------------------------------------------------------------------------------------------


BAD_TARGETS = [
    ("matches-nothing", ["nonexistent_proj"], ["nonexistent_proj", "not found"]),
    ("unsupported-type", ["embed_tokens"], ["model.embed_tokens", "Embedding", "Linear"]),
    # model.norm comes after every q_proj: this fails once four layers were already wrapped
    ("unsupported-after-wrapping", ["q_proj", "norm"], ["model.norm", "LlamaRMSNorm"]),
]


@pytest.mark.parametrize(
    ("target_modules", "substrings"), [row[1:] for row in BAD_TARGETS], ids=[row[0] for row in BAD_TARGETS]
)
def test_bad_targets_leave_model_unchanged(target_modules: list[str], substrings: list[str]) -> None:
    model = make_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # restoring must not just unfreeze everything
    batch = make_batch("llama")
    before = Snapshot.of(model, batch)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=target_modules, num_experts=2, top_k=1, r=2)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    for substring in substrings:
        assert substring in str(info.value), f"{substring!r} not in: {info.value}"
    before.assert_same(model, batch)
    assert_plain(model)


@pytest.mark.parametrize(
    ("target_modules", "substrings"), [row[1:] for row in BAD_TARGETS], ids=[row[0] for row in BAD_TARGETS]
)
def test_bad_targets_for_second_adapter(target_modules: list[str], substrings: list[str]) -> None:
    peft_model = get_peft_model(make_model("llama"), bundle_config())
    batch = make_batch("llama")
    before = Snapshot.of(peft_model, batch)
    config = MoPEConfig(task_type="CAUSAL_LM", target_modules=target_modules, num_experts=2, top_k=1, r=2)
    with pytest.raises(ValueError) as info:
        peft_model.add_adapter("second", config)
    for substring in substrings:
        assert substring in str(info.value), f"{substring!r} not in: {info.value}"
    before.assert_same(peft_model, batch)
    assert all("second" not in layer.mope_experts for layer in peft_model.modules() if isinstance(layer, MoPELayer))


# ---------------------------------------------------------------------------------------------
# 4. bundle errors
# ---------------------------------------------------------------------------------------------


def bundle_config(**overrides: Any) -> MoPEConfig:
    kwargs: dict[str, Any] = {
        "task_type": "CAUSAL_LM",
        "target_modules": "all-linear",
        "num_experts": 4,
        "top_k": 2,
        "r": 4,
        "init_weights": False,
    }
    return MoPEConfig(**{**kwargs, **overrides})


def save_bundle(name: str, folder: Path) -> Path:
    peft_model = get_peft_model(make_model(name), bundle_config(), adapter_name="default")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle("llama", tmp_path_factory.mktemp("llama_bundle"))


@pytest.fixture(scope="module")
def gpt2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle("gpt2", tmp_path_factory.mktemp("gpt2_bundle"))


def copy_bundle(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bad_bundle"
    shutil.copytree(source, target)
    return target


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def first_key(tensors: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def drop_tensor(folder: Path) -> list[str]:
    tensors = safetensors.torch.load_file(folder / WEIGHTS)
    key = first_key(tensors, "lora_B")
    del tensors[key]
    safetensors.torch.save_file(tensors, folder / WEIGHTS)
    return [str(folder / WEIGHTS), key, "missing"]


def reshape_tensor(folder: Path) -> list[str]:
    tensors = safetensors.torch.load_file(folder / WEIGHTS)
    key = first_key(tensors, "lora_A")
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    safetensors.torch.save_file(tensors, folder / WEIGHTS)
    return [str(folder / WEIGHTS), key, "wrong shapes"]


def truncate_file(folder: Path) -> list[str]:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    return [str(folder / WEIGHTS), "truncated"]


def remove_file(folder: Path) -> list[str]:
    (folder / WEIGHTS).unlink()
    return [str(folder), WEIGHTS]


def other_architecture(folder: Path) -> list[str]:
    return [str(folder), "gpt2", "llama"]


def more_experts_in_config(folder: Path) -> list[str]:
    edit_config(folder, num_experts=8)
    tensors = safetensors.torch.load_file(folder / WEIGHTS)
    return [str(folder / WEIGHTS), "wrong shapes", first_key(tensors, "mope_")]


# name -> (which bundle to start from, how to corrupt it; returns substrings the error must contain)
CORRUPTIONS: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "missing-tensor": ("llama", drop_tensor),
    "wrong-shape": ("llama", reshape_tensor),
    "truncated-file": ("llama", truncate_file),
    "missing-file": ("llama", remove_file),
    "other-architecture": ("gpt2", other_architecture),
    "num-experts-edited": ("llama", more_experts_in_config),
}


@pytest.fixture(params=sorted(CORRUPTIONS))
def bad_bundle(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[str]]:
    source_name, corrupt = CORRUPTIONS[request.param]
    source = request.getfixturevalue(f"{source_name}_bundle")
    folder = copy_bundle(source, tmp_path)
    return folder, corrupt(folder)


def load_with_peft(model: nn.Module, path: Path) -> PeftModel:
    return PeftModel.from_pretrained(model, path)


def load_with_mope(model: nn.Module, path: Path) -> PeftModel:
    return mope.load_mope(model, path)


@pytest.mark.parametrize("load", [load_with_peft, load_with_mope], ids=["PeftModel.from_pretrained", "load_mope"])
def test_bad_bundle_leaves_fresh_model_unchanged(
    load: Callable[[nn.Module, Path], PeftModel], bad_bundle: tuple[Path, list[str]]
) -> None:
    folder, substrings = bad_bundle
    model = make_model("llama", seed=3)
    batch = make_batch("llama")
    before = Snapshot.of(model, batch)
    with pytest.raises(ValueError) as info:
        load(model, folder)
    for substring in substrings:
        assert substring in str(info.value), f"{substring!r} not in: {info.value}"
    before.assert_same(model, batch)
    assert_plain(model)


def test_valid_bundle_loads(llama_bundle: Path) -> None:
    """Control for the corruption cases: the uncorrupted bundle loads through both entry points."""
    batch = make_batch("llama")
    reference = get_peft_model(make_model("llama"), bundle_config())
    expected = logits_of(reference, batch)
    for load in (load_with_peft, load_with_mope):
        loaded = load(make_model("llama"), llama_bundle)
        torch.testing.assert_close(logits_of(loaded, batch), expected)


def test_bad_bundle_as_second_adapter(llama_bundle: Path, bad_bundle: tuple[Path, list[str]]) -> None:
    folder, substrings = bad_bundle
    peft_model = PeftModel.from_pretrained(make_model("llama"), llama_bundle)
    batch = make_batch("llama")
    before = Snapshot.of(peft_model, batch)
    with pytest.raises(ValueError) as info:
        peft_model.load_adapter(folder, adapter_name="second")
    for substring in substrings:
        assert substring in str(info.value), f"{substring!r} not in: {info.value}"
    before.assert_same(peft_model, batch)
    assert list(peft_model.peft_config) == ["default"]
    assert all("second" not in layer.mope_experts for layer in peft_model.modules() if isinstance(layer, MoPELayer))


# ---------------------------------------------------------------------------------------------
# 5. merging
# ---------------------------------------------------------------------------------------------


def test_merge_of_input_routed_experts_refused() -> None:
    peft_model = get_peft_model(make_model("llama"), bundle_config())
    batch = make_batch("llama")
    before = Snapshot.of(peft_model, batch)
    with pytest.raises(ValueError) as info:
        peft_model.merge_and_unload()
    message = str(info.value)
    assert "routes by input" in message and "nothing was changed" in message
    assert "q_proj" in message or "_proj" in message
    before.assert_same(peft_model, batch)
    with pytest.raises(ValueError, match="routes by input"):
        peft_model.merge_adapter()
    before.assert_same(peft_model, batch)


def test_merge_of_single_expert_is_exact() -> None:
    peft_model = get_peft_model(make_model("llama"), bundle_config(num_experts=1, top_k=1))
    batch = make_batch("llama")
    expected = logits_of(peft_model, batch)
    base_logits = logits_of(make_model("llama"), batch)
    assert not torch.allclose(expected, base_logits, atol=1e-4), "init_weights=False should change the model"
    merged = peft_model.merge_and_unload()
    assert_plain(merged)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, batch), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. atomic save
# ---------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def half_written_save(tensors: dict, filename: str, *args: Any, **kwargs: Any) -> None:
    """Stands in for ``safetensors.torch.save_file`` when the disk fills up halfway through."""
    Path(filename).write_bytes(b"partial")
    raise OSError("disk full (simulated)")


def test_failed_save_keeps_previous_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "bundle"
    mope.save_pretrained(get_peft_model(make_model("llama"), bundle_config()), target)
    before = folder_bytes(target)
    assert {CONFIG, WEIGHTS} <= set(before)

    # PeftModel.save_pretrained calls the name it imported into peft.peft_model.
    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written_save)
    other = get_peft_model(make_model("llama", seed=5), bundle_config(num_experts=2, top_k=1))
    with pytest.raises(OSError, match="disk full"):
        mope.save_pretrained(other, target)

    assert folder_bytes(target) == before
    assert sorted(os.listdir(tmp_path)) == ["bundle"], "a temporary folder was left behind"


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written_save)
    with pytest.raises(OSError, match="disk full"):
        mope.save_pretrained(get_peft_model(make_model("llama"), bundle_config()), tmp_path / "bundle")
    assert os.listdir(tmp_path) == [], "a half-written bundle or temporary folder was left behind"
