"""Bundle files (mope.bundles.files): a broken or mismatched bundle raises a clear error naming the file and tensor
and changes nothing, through PeftModel.from_pretrained, mope.load_mope and load_adapter; saving is atomic.

Each refusal asserts the exception type, that its message names the problem, and that the model it was given is
exactly as it was before (conftest.Snapshot: modules, weights, trainability, hooks, config and outputs).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from conftest import Snapshot, assert_plain, bundle_config, make_batch, make_model, no_grad_logits
from peft import PeftModel, get_peft_model
from torch import nn

import mope
from mope import MoPEConfig, MoPELayer

WEIGHTS = "adapter_model.safetensors"


CONFIG = "adapter_config.json"


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
    expected = no_grad_logits(reference, batch)
    for load in (load_with_peft, load_with_mope):
        loaded = load(make_model("llama"), llama_bundle)
        torch.testing.assert_close(no_grad_logits(loaded, batch), expected)


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


def test_a_pickled_save_is_refused_before_anything_is_written(tmp_path):
    model = get_peft_model(make_model("llama"), bundle_config())
    mope.save_pretrained(model, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()}
    with pytest.raises(ValueError, match=r"safe_serialization=False would pickle .* nothing was written"):
        mope.save_pretrained(model, tmp_path / "bundle", safe_serialization=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left either


def test_save_options_a_compiled_model_and_other_processes_keep_the_old_bundle_or_write_it_whole(tmp_path):
    # a compiled model's keys start with _orig_mod.: with two adapters each file was written with no tensors over a
    # good bundle; is_main_process=False replaced the folder all the same; [] saved every adapter; 1 was refused
    from safetensors import safe_open

    model = get_peft_model(make_model("llama"), bundle_config())
    model.add_adapter("second", bundle_config(num_experts=2, top_k=1))
    target = tmp_path / "bundle"
    mope.save_pretrained(model, target)
    before = folder_bytes(target)
    mope.save_pretrained(model, target, is_main_process=False)
    mope.save_pretrained(model, tmp_path / "elsewhere", is_main_process=False)
    assert folder_bytes(target) == before and not (tmp_path / "elsewhere").exists()
    for bad in ([], ["nope"], "second"):
        with pytest.raises(ValueError, match=r"selected_adapters=.* must list some of this model's adapters"):
            mope.save_pretrained(model, target, selected_adapters=bad)
    assert folder_bytes(target) == before
    mope.save_pretrained(torch.compile(model), target, safe_serialization=1)
    for file in (target / WEIGHTS, target / "second" / WEIGHTS):
        with safe_open(str(file), framework="pt") as handle:
            assert list(handle.keys())
    assert folder_bytes(target) == before  # the same tensors, saved whole


def test_load_mope_reads_a_bundle_in_a_subfolder(tmp_path):
    # the config was read from the folder itself ("Can't find adapter_config.json") where PEFT took the subfolder
    model = get_peft_model(make_model("llama"), bundle_config())
    mope.save_pretrained(model, tmp_path / "outer" / "inner")
    loaded = mope.load_mope(make_model("llama"), tmp_path / "outer", subfolder="inner")
    batch = make_batch("llama")
    torch.testing.assert_close(no_grad_logits(loaded, batch), no_grad_logits(model, batch), rtol=0, atol=0)
