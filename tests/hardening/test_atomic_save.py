"""Crash-safe saves (mope.bundles.save, issue 16 item 2): the target holds the old bundle or the new one, whole.

The slow tests fork a child that saves and SIGKILLs itself before its N-th filesystem mutation, for N = 1, 2, ...
until a save completes: the mutations are counted by an audit hook (renames, links, removals, folder creation,
chmod, C functions looked up through ctypes, files opened for writing) and a stand-in for safetensors' Rust writer that stops halfway
through the tensor file. After every kill the folder must load with exactly the old or the new logits, keep its
other files, and the next save must leave no staging folder behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from conftest import bundle_config, make_batch, make_model, no_grad_logits
from peft import get_peft_model

import mope
import mope.bundles.save

USER_TEXT = "# My run\n\nNotes the user wrote.\n"
OTHERS = {  # what a training run keeps beside its bundle
    "tokenizer.json": b'{"version": "1.0"}',
    "trainer_state.json": b'{"global_step": 3}',
    "checkpoint-1/optimizer.pt": b"\x80optimizer state",
    "checkpoint-1/rng/state.txt": b"rng",
}
STALE_PICKLE = b"pickled tensors of an earlier safe_serialization=False save"
LEFTOVER_PREFIXES = (".mope-save-", ".mope-old-")
BATCH = {k: v for k, v in make_batch("llama").items() if k != "labels"}


def old_model():
    return get_peft_model(make_model("llama"), bundle_config())


def new_model():
    """Another mixture on the same base model (the loader builds the base from seed 0)."""
    base = make_model("llama")
    torch.manual_seed(5)
    return get_peft_model(base, bundle_config(num_experts=2, top_k=1, r=2))


def bundle_logits(folder: Path, model_name: str = "llama") -> torch.Tensor:
    return no_grad_logits(mope.load_mope(make_model(model_name), folder).eval(), BATCH)


def add_others(folder: Path) -> None:
    """A user's files and subfolders, a README and the stale .bin of a pickled PEFT save."""
    for name, data in OTHERS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text(USER_TEXT)
    (folder / "adapter_model.bin").write_bytes(STALE_PICKLE)


def assert_others_intact(folder: Path) -> None:
    for name, data in OTHERS.items():
        assert (folder / name).read_bytes() == data, f"{name} changed"
    assert USER_TEXT.strip() in (folder / "README.md").read_text(), "the user's README text was lost"


def leftovers(parent: Path) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith(LEFTOVER_PREFIXES))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- saves that complete ------------------------------------------------------------------------------------


def test_a_first_save_creates_the_folder_and_nothing_beside_it(tmp_path: Path) -> None:
    model = new_model()
    target = tmp_path / "run" / "bundle"
    mope.save_pretrained(model, target)
    assert os.listdir(tmp_path / "run") == ["bundle"]
    (tmp_path / "plain").mkdir()  # the folder gets the mode a plain mkdir gives, not mkdtemp's 0o700
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    torch.testing.assert_close(bundle_logits(target), no_grad_logits(model.eval(), BATCH), rtol=0, atol=0)


def test_a_save_over_a_folder_replaces_only_the_bundle_files(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    mope.save_pretrained(old_model(), target)
    add_others(target)
    os.symlink("checkpoint-1", target / "latest")
    os.mkfifo(target / "events")
    target.chmod(0o750)

    model = new_model()
    mope.save_pretrained(model, target)

    assert_others_intact(target)
    assert "library_name: peft" in (target / "README.md").read_text()  # PEFT updated the card, as in place
    assert os.readlink(target / "latest") == "checkpoint-1"
    assert stat.S_ISFIFO(os.lstat(target / "events").st_mode)
    assert not (target / "adapter_model.bin").exists(), "the stale pickle of an earlier save was kept"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert leftovers(tmp_path) == []
    torch.testing.assert_close(bundle_logits(target), no_grad_logits(model.eval(), BATCH), rtol=0, atol=0)


def test_a_save_through_a_link_to_a_folder_keeps_the_link(tmp_path: Path) -> None:
    """The swap happens at the folder the link points to: exchanging the link itself would replace it."""
    mope.save_pretrained(old_model(), tmp_path / "real")
    add_others(tmp_path / "real")
    os.symlink("real", tmp_path / "latest")
    model = new_model()
    mope.save_pretrained(model, tmp_path / "latest")
    assert os.readlink(tmp_path / "latest") == "real"
    assert_others_intact(tmp_path / "real")
    assert sorted(os.listdir(tmp_path)) == ["latest", "real"]
    torch.testing.assert_close(bundle_logits(tmp_path / "real"), no_grad_logits(model.eval(), BATCH), rtol=0, atol=0)


def test_a_save_of_two_adapters_replaces_both_and_keeps_the_subfolder_s_other_files(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    (target / "second").mkdir(parents=True)
    (target / "second" / "adapter_model.bin").write_bytes(STALE_PICKLE)
    (target / "second" / "notes.txt").write_text("kept")
    model = new_model()
    model.add_adapter("second", bundle_config(num_experts=3, top_k=2, r=2))

    mope.save_pretrained(model, target)

    assert sorted(os.listdir(target / "second")) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    model.eval()
    torch.testing.assert_close(bundle_logits(target), no_grad_logits(model, BATCH), rtol=0, atol=0)
    model.set_adapter("second")
    torch.testing.assert_close(bundle_logits(target / "second"), no_grad_logits(model, BATCH), rtol=0, atol=0)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("below", ["", "checkpoint-1"])
def test_a_save_into_the_working_folder_or_above_it_leaves_the_process_a_working_folder(tmp_path, monkeypatch, below):
    target = tmp_path / "bundle"
    mope.save_pretrained(old_model(), target)
    add_others(target)  # holds the subfolder checkpoint-1/
    monkeypatch.chdir(target / below)
    model = new_model()
    mope.save_pretrained(model, "." if not below else "..")
    assert os.getcwd() == str((target / below).resolve())
    Path("after.txt").write_text("written after the save")  # the old folder's deletion took the process's away
    assert (target / below / "after.txt").read_text() == "written after the save"
    assert_others_intact(target)
    assert leftovers(tmp_path) == []
    torch.testing.assert_close(bundle_logits(target), no_grad_logits(model.eval(), BATCH), rtol=0, atol=0)


def refused_exchange(*args: Any) -> int:
    """renameat2 as on a filesystem that cannot exchange (EINVAL)."""
    ctypes.set_errno(errno.EINVAL)
    return -1


def test_where_the_filesystem_refuses_the_exchange_the_save_renames_the_old_folder_away(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    mope.save_pretrained(old_model(), target)
    add_others(target)
    monkeypatch.setattr(mope.bundles.save, "libc_renameat2", lambda: refused_exchange)
    model = new_model()
    mope.save_pretrained(model, target)
    assert_others_intact(target)
    assert os.listdir(tmp_path) == ["bundle"]
    torch.testing.assert_close(bundle_logits(target), no_grad_logits(model.eval(), BATCH), rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders_in_one_step_on_linux(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert mope.bundles.save.exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.listdir(tmp_path / "a") == [] and (tmp_path / "b" / "x").read_text() == "a"


# --- saves that are refused or fail -------------------------------------------------------------------------


def config_write_fails(*args: Any, **kwargs: Any) -> None:
    raise OSError("disk full (simulated)")


def test_a_failing_save_leaves_the_old_folder_byte_identical(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    mope.save_pretrained(old_model(), target)
    add_others(target)
    before = folder_bytes(target)
    # PEFT writes the model card, then the tensors, then the config: this fails last, inside PEFT.
    monkeypatch.setattr(mope.MoPEConfig, "save_pretrained", config_write_fails)
    with pytest.raises(OSError, match="disk full"):
        mope.save_pretrained(new_model(), target)
    assert folder_bytes(target) == before  # the README too: PEFT rewrote a copy, not a link to it
    assert os.listdir(tmp_path) == ["bundle"]


def test_an_empty_path_and_a_file_as_parent_are_refused_naming_them(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a save that took "" for "." would write
    with pytest.raises(ValueError, match="save_directory is empty"):
        mope.save_pretrained(new_model(), "")
    (tmp_path / "parent").write_text("a file")
    with pytest.raises(ValueError, match=r"'.*parent' is a file, not a folder"):
        mope.save_pretrained(new_model(), tmp_path / "parent" / "bundle")
    assert os.listdir(tmp_path) == ["parent"]


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bundle").write_text("not a folder")
    with pytest.raises(ValueError, match=r"'.*bundle' is a file, not a folder; pass a folder path"):
        mope.save_pretrained(new_model(), tmp_path / "bundle")
    assert (tmp_path / "bundle").read_text() == "not a folder"
    assert os.listdir(tmp_path) == ["bundle"]


def test_leftovers_of_ended_saves_are_removed_and_those_of_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    mope.save_pretrained(old_model(), target)
    gone = dead_pid()
    kept = [".mope-save-bundle-1-0123abcd", f".mope-save-bundle2-{gone}-0123abcd", ".mope-save-bundle-x-0123abcd"]
    removed = [f".mope-save-bundle-{gone}-0123abcd", f".mope-old-bundle-{gone}-4567cdef"]
    for name in kept + removed:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    mope.save_pretrained(new_model(), target)
    assert sorted(os.listdir(tmp_path)) == sorted(["bundle", *kept])  # pid 1 runs; bundle2 is another target


def test_a_save_killed_between_the_fallback_s_renames_is_named_by_the_next_save(tmp_path: Path) -> None:
    backup = tmp_path / f".mope-old-bundle-{dead_pid()}-0123abcd"
    mope.save_pretrained(old_model(), backup)
    before = folder_bytes(backup)
    with pytest.raises(ValueError, match=r"was killed between .* are in '.*\.mope-old-bundle-.*'\. Rename it back"):
        mope.save_pretrained(new_model(), tmp_path / "bundle")
    assert os.listdir(tmp_path) == [backup.name]
    assert folder_bytes(backup) == before


# --- kills at every step ------------------------------------------------------------------------------------

MUTATIONS = {
    "os.rename",
    "os.link",
    "os.symlink",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.truncate",
    "shutil.rmtree",
    "shutil.copyfile",
    "ctypes.dlsym",  # ctypes raises no event when it calls a C function (renameat2); resolving it comes just before
    "test.torn_write",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def kill_before_mutation(step: int) -> None:
    """SIGKILL this process just before its ``step``-th filesystem mutation from now on."""
    count = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        if event == "open":
            mode, flags = args[1], args[2]
            if not (any(c in mode for c in "wax+") if mode else flags & WRITE_FLAGS):
                return
        elif event not in MUTATIONS:
            return
        count += 1
        if count == step:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def torn_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
    """safetensors' save_file in Python, with a mutation counted when half the bytes are on disk."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        sys.audit("test.torn_write")
        handle.write(data[len(data) // 2 :])


def save_killed_at(step: int, model, target: Path, exchange: bool) -> bool:
    """Save in a forked child killed before its ``step``-th mutation; True if the save completed first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            sys.dont_write_bytecode = True
            peft.peft_model.safe_save_file = torn_save_file
            if not exchange:
                mope.bundles.save.exchange = lambda first, second: False
            kill_before_mutation(step)
            mope.save_pretrained(model, target)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, f"the save raised at step {step} (see the captured stderr)"
        return True
    assert os.WTERMSIG(status) == signal.SIGKILL
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "exchange"), [(False, True), (False, False), (True, True)], ids=["exchange", "rename-fallback", "first"]
)
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_bundle(tmp_path: Path, first: bool, exchange: bool):
    pristine, reference, parent = tmp_path / "pristine", tmp_path / "reference", tmp_path / "run"
    mope.save_pretrained(old_model(), pristine)
    add_others(pristine)
    model = new_model()
    mope.save_pretrained(model, reference)
    old, new = bundle_logits(pristine), bundle_logits(reference)
    assert not torch.equal(old, new)
    target = parent / "bundle"
    seen = set()
    for step in range(1, 200):
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        if not first:
            shutil.copytree(pristine, target, symlinks=True)
        completed = save_killed_at(step, model, target, exchange)

        backups = [name for name in leftovers(parent) if name.startswith(".mope-old-")]
        if not target.exists() and backups:  # only the fallback, between its two renames
            assert not exchange
            with pytest.raises(ValueError, match=rf"are in '{parent / backups[0]}'\. Rename it back"):
                mope.save_pretrained(model, target)
            os.rename(parent / backups[0], target)  # as the message says
            seen.add("stranded")
        if not target.exists():
            assert first, f"killed at step {step}, the old bundle is gone"
            seen.add("none")
        else:
            logits = bundle_logits(target)
            state = "new" if torch.equal(logits, new) else "old"
            torch.testing.assert_close(logits, new if state == "new" else old, rtol=0, atol=0)
            seen.add(state)
            if not first:
                assert_others_intact(target)
                assert (target / "adapter_model.bin").exists() == (state == "old")
        if completed:
            assert state == "new" and os.listdir(parent) == ["bundle"]
            break

        mope.save_pretrained(model, target)  # the next save cleans up after the killed one
        assert os.listdir(parent) == ["bundle"], f"killed at step {step}, the next save left {leftovers(parent)}"
        torch.testing.assert_close(bundle_logits(target), new, rtol=0, atol=0)
        if not first:
            assert_others_intact(target)
    else:
        pytest.fail("the save never completed")
    assert step > 10, "too few mutations were counted for the test to mean anything"
    assert seen >= ({"none", "new"} if first else {"old", "new"} | ({"stranded"} if not exchange else set()))
