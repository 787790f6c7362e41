"""Loading bundles written by other mope versions: old ones upgraded and said so, newer or broken ones refused."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model

import mope
from mope.bundles import upgrade
from mope.layer import MoPELayer
from mope.version import MOPE_VERSION


@pytest.fixture
def bundle(tmp_path):
    """A saved bundle and the logits of the model that wrote it."""
    model = get_peft_model(
        make_model("llama"),
        mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"], r=4, init_weights=False),
    ).eval()
    model.save_pretrained(tmp_path)
    batch = make_batch("llama", pad=2)
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    return tmp_path, batch, logits


def edit_config(folder, edit) -> str:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return str(path)


LOADERS = {
    "peft": lambda base, folder: PeftModel.from_pretrained(base, folder),
    "load_mope": lambda base, folder: mope.load_mope(base, folder),
}


def assert_refused(folder, loader: str, error: type[Exception], match: str) -> None:
    """Loading fails with ``error`` and leaves the base model exactly as it was."""
    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error, match=match):
        LOADERS[loader](base, folder)
    assert not any(isinstance(m, MoPELayer) for m in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("old_version", ["0.0.9", None])
def test_old_bundle_loads_with_defaults_and_says_so(bundle, loader, old_version, caplog, tmp_path_factory):
    folder, batch, want = bundle

    def make_old(config):
        del config["top_k_order"]  # a field this old version did not write
        if old_version is None:
            del config["mope_version"]
        else:
            config["mope_version"] = old_version

    edit_config(folder, make_old)
    with caplog.at_level(logging.WARNING, logger="mope.bundles.upgrade"):
        loaded = LOADERS[loader](make_model("llama"), folder)
    label = old_version or "unversioned"
    messages = [r.getMessage() for r in caplog.records if r.name == "mope.bundles.upgrade"]
    assert any("top_k_order" in m and "'softmax_then_topk'" in m and label in m for m in messages), messages
    assert any(f"mope_version {label} -> {MOPE_VERSION}" in m for m in messages), messages
    config = loaded.peft_config["default"]
    assert config.upgraded_from == label and config.mope_version == MOPE_VERSION
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
    # saved again, the bundle is a current one: it loads silently and records no upgrade
    again = tmp_path_factory.mktemp("again")
    loaded.save_pretrained(again)
    saved = json.loads((again / "adapter_config.json").read_text())
    assert saved["mope_version"] == MOPE_VERSION and "upgraded_from" not in saved and "bundle" not in saved
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mope.bundles.upgrade"):
        assert mope.MoPEConfig.from_pretrained(str(again)).upgraded_from is None
    assert not [r for r in caplog.records if r.name == "mope.bundles.upgrade"]


def test_upgrade_steps_run_for_older_configs_only(bundle, monkeypatch, caplog):
    folder, batch, want = bundle
    monkeypatch.setitem(upgrade.UPGRADE_STEPS, "0.0.5", lambda c: upgrade.rename_key(c, "expert_rank", "r"))

    def old_name(config):
        config["expert_rank"] = config.pop("r")
        config["mope_version"] = "0.0.4"

    path = edit_config(folder, old_name)
    with caplog.at_level(logging.WARNING, logger="mope.bundles.upgrade"):
        loaded = mope.load_mope(make_model("llama"), folder)
    assert loaded.peft_config["default"].r == 4
    assert any("'expert_rank' to 'r' (value 4)" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
    # a config already at the step's version is not rewritten: the old key is then unknown
    edit_config(folder, lambda c: c.update(mope_version="0.0.5"))
    with pytest.raises(ValueError, match=re.escape(f"'{path}': unknown key 'expert_rank'")):
        mope.MoPEConfig.from_pretrained(str(folder))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_newer_bundle_is_refused_naming_file_and_versions(bundle, loader):
    folder, _, _ = bundle
    path = edit_config(folder, lambda c: c.update(mope_version="9.0.0"))
    match = re.escape(f"'{path}' was written by mope 9.0.0, newer than this mope {MOPE_VERSION}: upgrade mope")
    assert_refused(folder, loader, ValueError, match)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_unknown_key_is_refused_naming_it(bundle, loader):
    folder, _, _ = bundle
    path = edit_config(folder, lambda c: c.update(top_kk=2))
    assert_refused(folder, loader, ValueError, re.escape(f"'{path}': unknown key 'top_kk'") + ".*did you mean 'top_k'")


def test_unreadable_version_is_refused(bundle):
    folder, _, _ = bundle
    edit_config(folder, lambda c: c.update(mope_version="banana"))
    assert_refused(folder, "load_mope", ValueError, r"mope_version='banana' is not a version number")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["invalid", "not_an_object"])
def test_malformed_config_is_refused_naming_the_file(bundle, text):
    folder, _, _ = bundle
    path = folder / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"Cannot read '{path}'")):
        mope.MoPEConfig.from_pretrained(str(folder))
    assert_refused(folder, "load_mope", ValueError, re.escape(f"Cannot read '{path}'"))


def test_peft_reads_the_peft_type_before_mope_sees_the_file(bundle):
    """Documented limit: PeftModel.from_pretrained parses the JSON itself first (PeftConfig._get_peft_type)."""
    folder, _, _ = bundle
    (folder / "adapter_config.json").write_text("{not json")
    assert_refused(folder, "peft", json.JSONDecodeError, "Expecting property name")
