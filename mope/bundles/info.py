"""What a bundle holds, from its config file and the safetensors header alone (no model, no tensor data).

``mope inspect`` prints this; it is cheap enough to run on any bundle, also one for a base
model the machine does not have.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from packaging.version import Version
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..version import MOPE_VERSION
from .files import read_bundle_header
from .upgrade import newer_than_this, upgraded, written_by

# Parameter groups by the attribute a tensor name passes through (MoPELayer.adapter_layer_names).
PARAMETER_GROUPS = {".mope_experts.": "experts", ".mope_router.": "routers"}
# Config fields shown as the summary, in this order.
SUMMARY_FIELDS = (
    "task_type",
    "expert_type",
    "num_experts",
    "num_shared_experts",
    "r",
    "router",
    "top_k",
    "routing_level",
    "capacity_factor",
    "target_modules",
    "modules_to_save",
    "base_model_name_or_path",
)


@dataclass
class BundleInfo:
    config: dict  # adapter_config.json as written
    adapted_modules: int  # modules carrying experts
    parameters: dict[str, int] = field(default_factory=dict)  # experts / routers / other
    file_bytes: int = 0  # adapter_model.safetensors + adapter_config.json

    def summary(self) -> dict[str, object]:
        return {key: self.config.get(key) for key in SUMMARY_FIELDS}

    def written_by(self) -> tuple[str, str | None]:
        """The mope version that wrote the bundle, against this one, and a warning when this mope cannot load it.

        A newer bundle is described all the same (the header and config are plain files), but
        loading it is refused (:func:`mope.bundles.upgrade.upgrade_config`), and fields this
        version does not know are not in the summary: the warning says both.
        """
        current = Version(MOPE_VERSION)
        try:
            version, label = written_by(self.config, CONFIG_NAME)
        except ValueError as error:
            return (
                f"{self.config.get('mope_version')!r} (not a version number)",
                f"this bundle cannot be loaded: {error}",
            )
        if version > current:
            note = "this bundle " + newer_than_this(label)
            return (
                f"mope {label}: NEWER than this mope {current}",
                f"{note} The summary shows only the fields this version knows.",
            )
        said = f"mope {label} " + (
            "(older: upgraded when loaded, each change logged)" if version < current else "(this version)"
        )
        from ..config import MoPEConfig  # here: the config module reads bundles through this package

        try:
            upgraded(self.config, MoPEConfig, CONFIG_NAME)
        except ValueError as error:  # e.g. an unknown key
            return said, f"this bundle cannot be loaded: {error}"
        return said, None


def read_config(folder: str | os.PathLike) -> dict:
    """``adapter_config.json`` of a MoPE bundle; ValueError naming the folder when absent or not MoPE."""
    path = os.path.join(folder, CONFIG_NAME)
    if os.path.isfile(folder):
        raise ValueError(
            f"'{folder}' is a file; a bundle is a folder holding {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}"
        )
    if not os.path.isdir(folder):
        raise ValueError(f"bundle folder '{folder}' does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"'{folder}' is not a bundle: it has no {CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "MOPE":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"'{folder}' is not a MoPE bundle (peft_type {found!r} in {CONFIG_NAME})")
    return config


def describe_bundle(folder: str | os.PathLike) -> BundleInfo:
    """Config, adapted-module count, parameter counts by group and file size of the bundle in ``folder``."""
    folder = os.fspath(folder)
    config = read_config(folder)
    header = read_bundle_header(folder)
    parameters = {"experts": 0, "routers": 0, "other": 0}
    modules = set()
    for name, shape in header.items():
        group = next((g for marker, g in PARAMETER_GROUPS.items() if marker in name), "other")
        parameters[group] += math.prod(shape)
        if group == "experts":
            modules.add(name.split(".mope_experts.")[0])
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME))
    return BundleInfo(config, len(modules), parameters, size)
