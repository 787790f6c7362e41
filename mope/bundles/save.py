"""Crash-safe bundle saves: the new folder is built complete beside the target, then swapped in by one rename.

Why a whole folder: a bundle is several files (``adapter_config.json`` + ``adapter_model.safetensors``, and such a
pair in a subfolder per non-default adapter), and no filesystem replaces several files in one step. Moving them one
by one (the first version) left new tensors beside the old config when the process died between two moves. So a
save builds the complete new folder beside the target -- PEFT writes the bundle's files into it, then every other
entry of the old folder (tokenizer, trainer state, README, subfolders) is hard-linked into it (copied where the
filesystem refuses links) -- and the two folder names are exchanged in one step. A reader sees the old folder or the
new one, never a mix. (A manifest that the loader trusts would also work, but only for mope's loader: PEFT's
``from_pretrained`` reads the files themselves.)

The step that switches:

- Linux: ``renameat2(..., RENAME_EXCHANGE)`` through libc (kernel 3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs).
- First save (no target yet): a plain ``os.rename``.
- Elsewhere, or where the filesystem refuses the exchange (EINVAL, ENOSYS): the old folder is renamed to a backup
  (``.mope-old-<name>-<pid>-<random>``), the new one renamed in, the backup deleted. A crash between the two renames
  leaves no target; the next save to it refuses and names the backup to rename back.

A save into this process's working folder (``"."``) or a folder above it moves the process into the same path
in the new folder after the switch, so relative paths keep working. The new files and folders are fsynced before
the switch. What a killed save leaves (its staging folder
``.mope-save-<name>-<pid>-<random>``, or the old folder under that name after the switch, or a backup) is removed by
the next save to the same target once no process with that pid runs on this machine: a live save's staging is never
touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator

from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from ..peft_compat import without_other_adapters
from .files import read_bundle_header

STAGING = ".mope-save-"  # the new folder while it is built; after an exchange, the old one while it is deleted
BACKUP = ".mope-old-"  # the old folder between the two renames of the fallback
MODEL_CARD = "README.md"  # PEFT updates this file in place instead of writing it afresh


def save_pretrained(model, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained`` made crash-safe: the target holds the old bundle or the new one, whole.

    Only the bundle's own files are replaced (``adapter_config.json``, ``adapter_model.safetensors``, those of each
    adapter's subfolder, PEFT's model card); a stale ``adapter_model.bin`` beside a new safetensors file is dropped;
    every other file and subfolder of the target is kept. ``safe_serialization=False`` is refused before anything
    is written: it would pickle the tensors into ``adapter_model.bin``, which mope never loads.
    """
    if not kwargs.get("safe_serialization", True):
        raise ValueError(
            f"mope.save_pretrained: safe_serialization={kwargs['safe_serialization']!r} would pickle the tensors "
            "into adapter_model.bin, and mope loads safetensors bundles only; nothing was written."
        )
    if not kwargs.get("is_main_process", True):  # every process calls save; one writes (accelerate's pattern)
        return
    check_selected(getattr(model, "peft_config", {}), kwargs.get("selected_adapters"))
    if not os.fspath(save_directory):
        raise ValueError("mope.save_pretrained: save_directory is empty; pass a folder path ('.' for this folder).")
    target = os.path.realpath(os.fspath(save_directory))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"mope.save_pretrained: '{target}' is a file, not a folder; pass a folder path.")
    parent = os.path.dirname(target)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise ValueError(f"mope.save_pretrained: '{parent}' is a file, not a folder; pass a folder path.")
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(target)
    staging = new_sibling(target, STAGING)
    os.mkdir(staging)
    to_delete: str | None = staging
    try:
        old = target if os.path.isdir(target) else None
        if old is not None:
            shutil.copymode(old, staging)
            if os.path.isfile(os.path.join(old, MODEL_CARD)):  # a copy, not a link: PEFT rewrites it
                shutil.copy2(os.path.join(old, MODEL_CARD), os.path.join(staging, MODEL_CARD))
        write_bundle(model, staging, kwargs)
        written = set(files_under(staging))
        sync(staging, written)
        if old is not None:
            carry_over(old, staging, written)
        cwd = working_folder_inside(target)
        to_delete = switch(staging, target)
        if cwd is not None:  # the old folder, about to be deleted, held this process's working folder
            os.chdir(cwd)  # the same path, now in the new folder (its subfolders were carried over)
        sync_folder(os.path.dirname(target))
    finally:
        if to_delete is not None:
            shutil.rmtree(to_delete, ignore_errors=True)


def working_folder_inside(target: str) -> str | None:
    """This process's working folder if it is ``target`` or below it (``save_pretrained(model, ".")``), else None."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    return cwd if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep) else None


class OnlyAdapter(dict):
    """The model's adapter configs as PEFT's save sees them while one adapter is saved: listed, only that one (PEFT
    drops the tensors of every other adapter it lists, by substring); looked up, any (the model card reads the
    active adapter's)."""

    def __init__(self, configs: dict, name: str) -> None:
        super().__init__({name: configs[name]})
        self.configs = configs

    def __missing__(self, key: str):
        return self.configs[key]


def write_bundle(model, folder: str, kwargs: dict) -> None:
    """PEFT's own save into ``folder``, each adapter's file holding exactly its own tensors.

    With several adapters, each is saved alone, with mope's filter (by place) and only its own config in the model's
    view: PEFT's filter drops every key with another adapter's name as a dotted part (a second adapter named 'mlp'
    or 'model' left 6 or 24 of the first one's 12 tensors), and PEFT 0.19 filtered nothing for other methods.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its state_dict keys start with _orig_mod.
    adapters = list(getattr(model, "peft_config", {}))
    selected = kwargs.get("selected_adapters") or adapters
    if "state_dict" in kwargs:  # gathered from a compiled model (accelerate's get_state_dict): its keys' prefix too
        kwargs["state_dict"] = {key.removeprefix("_orig_mod."): value for key, value in kwargs["state_dict"].items()}
    if len(adapters) < 2 or "state_dict" in kwargs:
        model.save_pretrained(folder, **kwargs)
    else:
        kwargs.pop("selected_adapters", None)
        state, configs = model.state_dict(), model.peft_config
        for name in selected:
            only = without_other_adapters(state, name, adapters)
            model.peft_config = OnlyAdapter(configs, name)
            try:
                model.save_pretrained(folder, selected_adapters=[name], state_dict=only, **kwargs)
            finally:
                model.peft_config = configs
    for name in selected:  # before the old bundle is replaced
        adapter_folder = os.path.join(folder, "" if name == "default" else name)
        if os.path.isfile(os.path.join(adapter_folder, SAFETENSORS_WEIGHTS_NAME)) and not read_bundle_header(
            adapter_folder
        ):
            raise ValueError(
                f"mope.save_pretrained: adapter '{name}' would be saved with no tensors; nothing was written."
            )


def check_selected(configs, selected) -> None:
    """``selected_adapters`` names adapters of the model, at least one (a ValueError before anything is written)."""
    if selected is None:
        return
    unknown = [name for name in selected if name not in configs]
    if not selected or unknown or isinstance(selected, str):
        raise ValueError(
            f"mope.save_pretrained: selected_adapters={selected!r} must list some of this model's adapters "
            f"{sorted(configs)}; nothing was written."
        )


def carry_over(old: str, new: str, written: set[str], relative: str = "") -> None:
    """Link (or copy) into ``new`` every entry of ``old`` the save did not write, folders recursively.

    An ``adapter_model.bin`` is dropped where the save wrote that adapter's safetensors file: it is the stale
    pickle of an earlier ``safe_serialization=False`` save, and loaders that prefer it would load old weights.
    """
    for entry in os.scandir(old):
        name = os.path.join(relative, entry.name)
        destination = os.path.join(new, entry.name)
        stale_pickle = entry.name == WEIGHTS_NAME and os.path.join(relative, SAFETENSORS_WEIGHTS_NAME) in written
        if name in written or stale_pickle:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            if not os.path.isdir(destination):
                os.mkdir(destination)
                shutil.copymode(entry.path, destination)
            carry_over(entry.path, destination, written, name)
        else:
            link_or_copy(entry.path, destination, copyable=entry.is_file())


def link_or_copy(source: str, destination: str, copyable: bool) -> None:
    """A hard link (instant, no extra space); a copy of a regular file where the filesystem refuses links.

    Fifos and sockets are linked too (a copy would block or mean nothing); where that is refused the save stops.
    """
    try:
        os.link(source, destination)
    except OSError as error:
        if not copyable:
            raise ValueError(
                f"mope.save_pretrained: '{source}' is not a regular file and cannot be linked into the new bundle "
                f"folder ({error}); move it out of '{os.path.dirname(source)}' and save again."
            ) from error
        shutil.copy2(source, destination)


def switch(staging: str, target: str) -> str | None:
    """Put ``staging`` at ``target`` in one step where possible; returns the folder now holding the old one."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return None
    if exchange(staging, target):
        return staging
    backup = new_sibling(target, BACKUP)
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(backup, target)
        raise
    return backup


def exchange(first: str, second: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where not available."""
    renameat2 = libc_renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem or kernel cannot exchange
        return False
    raise OSError(code, os.strerror(code), first, None, second)


def libc_renameat2():
    """libc's ``renameat2``, or None off Linux or with a libc older than glibc 2.28."""
    if not sys.platform.startswith("linux"):
        return None
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        renameat2.restype = ctypes.c_int
    return renameat2


def new_sibling(target: str, kind: str) -> str:
    """A fresh name beside ``target`` saying what it is, whose target it belongs to and which process made it."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f"{kind}{name}-{os.getpid()}-{secrets.token_hex(4)}")


def leftovers(target: str) -> Iterator[tuple[str, str]]:
    """(path, kind) of the staging folders and backups of ``target`` whose process is gone."""
    parent, name = os.path.split(target)
    for entry in os.listdir(parent):
        for kind in (STAGING, BACKUP):
            prefix = f"{kind}{name}-"
            match = re.fullmatch(r"(\d+)-[0-9a-f]{8}", entry[len(prefix) :]) if entry.startswith(prefix) else None
            if match and process_is_gone(int(match[1])):
                yield os.path.join(parent, entry), kind


def remove_leftovers(target: str) -> None:
    """Delete what killed saves of ``target`` left, or refuse if one died holding the old folder as a backup."""
    found = list(leftovers(target))
    stranded = [path for path, kind in found if kind == BACKUP and not os.path.lexists(target)]
    if stranded:
        raise ValueError(
            f"mope.save_pretrained: an earlier save of '{target}' was killed between moving the old folder away "
            f"and moving the new one in; the old bundle and your other files are in '{stranded[0]}'. Rename it "
            f"back to '{target}' (or delete it if you do not need it) and save again; nothing was written."
        )
    for path, _kind in found:
        shutil.rmtree(path, ignore_errors=True)


def process_is_gone(pid: int) -> bool:
    """True only when no process with ``pid`` runs here (POSIX); elsewhere never, so nothing live is deleted."""
    if os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def files_under(folder: str) -> Iterator[str]:
    """Paths of the files below ``folder``, relative to it."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            yield os.path.relpath(os.path.join(root, name), folder)


def sync(folder: str, files: set[str]) -> None:
    """fsync the files the save wrote and their folders, so that the switch never exposes unwritten data."""
    for name in files:
        with open(os.path.join(folder, name), "rb") as handle:
            os.fsync(handle.fileno())
    for name in {os.path.dirname(name) for name in files} | {""}:
        sync_folder(os.path.join(folder, name))


def sync_folder(path: str) -> None:
    """fsync a folder's entries (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
