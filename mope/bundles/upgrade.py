"""Read a bundle's ``adapter_config.json`` and upgrade it, explicitly, to this mope version.

Every ``adapter_config.json`` records the ``mope_version`` that wrote it (no key at all: the
oldest bundles, before versions were recorded). Loading one (``MoPEConfig.from_pretrained``, so
also ``PeftModel.from_pretrained``, ``model.load_adapter`` and ``mope.load_mope``) goes through
:func:`read_config_file`:

1. The file must be a JSON object: anything else is a ``ValueError`` naming the file.
2. A config written by a *newer* mope is refused (``ValueError`` naming the file and both
   versions): its keys may mean things this version cannot know, so guessing would be silent damage.
3. The steps of :data:`UPGRADE_STEPS` whose version is newer than the config's run in version
   order; each renames or rewrites keys of the version before it and says what it did.
4. A key this mope does not know is a ``ValueError`` naming the key and the file (PEFT would
   only warn and drop it: a typo'd or hand-edited key would silently fall back to a default).
5. mope's own fields missing from the file get their defaults (a field added since the bundle
   was written).

Each change is logged (``logging.warning`` on the ``mope.bundles.upgrade`` logger, naming the file, the
key and the value), the upgraded config carries ``mope_version`` = this version, and
``MoPEConfig.upgraded_from`` records the version the file was written by ('unversioned' if it had
none); it is None when nothing changed. nanochat's ``_patch_missing_config_keys`` is the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Callable
from typing import Any

from packaging.version import InvalidVersion, Version
from peft import PeftConfig

from ..version import MOPE_VERSION

logger = logging.getLogger(__name__)

# What a bundle without mope_version counts as: older than every released version.
UNVERSIONED = "unversioned"
OLDEST = Version("0")

# An upgrade step rewrites a config dict of the version before it in place and returns what it
# changed, one human-readable line per change (e.g. from rename_key).
UpgradeStep = Callable[[dict[str, Any]], list[str]]

# version that changed the config format -> the step that brings an older config up to it.
# Empty while no release has renamed or changed a field (0.1.0 is the first format); add a line
# per format change, e.g. {"0.2.0": lambda config: rename_key(config, "expert_rank", "r")}.
UPGRADE_STEPS: dict[str, UpgradeStep] = {}


def rename_key(config: dict[str, Any], old: str, new: str) -> list[str]:
    """Move ``config[old]`` to ``config[new]`` (an upgrade step's building block)."""
    if old not in config:
        return []
    value = config.pop(old)
    config[new] = value
    return [f"renamed key '{old}' to '{new}' (value {value!r})"]


def read_json_object(path: str) -> dict[str, Any]:
    """PEFT's reading of ``adapter_config.json``, with a ``ValueError`` naming the file when it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as file:
            loaded = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read '{path}': it is not valid JSON ({error}).") from error
    if not isinstance(loaded, dict):  # before PEFT's reading, which fails on a scalar with a TypeError
        kind = "null" if loaded is None else type(loaded).__name__
        raise ValueError(f"Cannot read '{path}': expected a JSON object of config keys, got {kind}.")
    return PeftConfig.from_json_file(path)


def written_by(config: dict[str, Any], path: str) -> tuple[Version, str]:
    """The mope version that wrote ``config`` (oldest if it records none) and its label for messages."""
    raw = config.get("mope_version")
    if raw is None:
        return OLDEST, UNVERSIONED
    try:
        return Version(str(raw)), str(raw)
    except InvalidVersion as error:
        raise ValueError(f"'{path}': mope_version={raw!r} is not a version number.") from error


def saved_field_defaults(config_cls: type) -> dict[str, Any]:
    """Defaults of the config class's own saved fields (PEFT's base fields and runtime-only ones excluded)."""
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    runtime = set(getattr(config_cls, "RUNTIME_FIELDS", ()))
    defaults = {}
    for f in dataclasses.fields(config_cls):
        if f.name in base or f.name in runtime:
            continue
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def check_known_keys(config: dict[str, Any], config_cls: type, path: str, label: str) -> None:
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"'{path}': unknown key '{key}' in a config written by mope {label} (this is mope "
                f"{MOPE_VERSION}, which knows no such field){hint} Remove or fix the key."
            )


def newer_than_this(label: str) -> str:
    """What a config written by a newer mope means: the loader's refusal and ``mope inspect``'s warning say the same."""
    return (
        f"was written by mope {label}, newer than this mope {MOPE_VERSION}: upgrade mope (pip install -U mope) "
        "to load it; this version refuses it because its keys may mean things this version cannot know."
    )


def upgrade_config(config: dict[str, Any], config_cls: type, path: str) -> tuple[dict[str, Any], str | None]:
    """``config`` brought to this mope version, and the version it was written by if anything changed (else None);
    each change is logged."""
    config, label, changes = upgraded(config, config_cls, path)
    for change in changes:
        logger.warning("Upgrading '%s' (mope %s): %s", path, label, change)
    return config, (label if changes else None)


def upgraded(config: dict[str, Any], config_cls: type, path: str) -> tuple[dict[str, Any], str, list[str]]:
    """``config`` brought to this mope version, the version label it was written by, and what changed (nothing
    logged: ``mope inspect`` asks whether a bundle loads)."""
    current = MOPE_VERSION
    version, label = written_by(config, path)
    if version > Version(current):
        raise ValueError(f"'{path}' {newer_than_this(label)}")
    config = dict(config)
    changes = []
    for step_version, step in sorted(UPGRADE_STEPS.items(), key=lambda item: Version(item[0])):
        if version < Version(step_version):
            changes += [f"{change} (upgrade to mope {step_version})" for change in step(config)]
    check_known_keys(config, config_cls, path, label)
    for key, default in saved_field_defaults(config_cls).items():
        if key not in config and key != "mope_version":
            config[key] = default
            changes.append(f"missing key '{key}' set to its default {default!r}")
    if version != Version(current):
        changes.append(f"mope_version {label} -> {current}")
    config["mope_version"] = current
    return config, label, changes


def read_config_file(path: str, config_cls: type) -> dict[str, Any]:
    """The keyword arguments of ``config_cls`` stored in ``path``, upgraded; ``upgraded_from`` says from what."""
    config, upgraded_from = upgrade_config(read_json_object(path), config_cls, path)
    config["upgraded_from"] = upgraded_from
    return config
