"""What differs in the older PEFT releases mope supports (0.19, 0.20); each line says which release changed it.

Nothing here patches PEFT: mope's own classes read these flags.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

# PEFT >= 0.20 freezes BaseTunerLayer.frozen_peft_weight_names again after set_adapter and the
# mark-trainable pass; on PEFT 0.19 MoPELayer.keep_frozen does it.
PEFT_KEEPS_FROZEN = hasattr(BaseTunerLayer, "_freeze_non_trainable_peft_weights")
# PEFT >= 0.21 passes every adapter's loaded tensors through the tuner (BaseTuner._remap_adapter_state_dict_for_load),
# where MoPEModel refuses tensors that do not fit; PEFT 0.19 and 0.20 load them without asking the tuner.
PEFT_CHECKS_LOADED_TENSORS = hasattr(BaseTuner, "_remap_adapter_state_dict_for_load")
# PEFT >= 0.21 asks the tuner how a key is saved (BaseTuner._remove_adapter_name_from_key): MoPEModel then saves
# whole-FFN keys without the adapter name; older PEFT keeps it there, and loading drops it (without_ffn_name)
PEFT_ASKS_SAVED_KEYS = hasattr(BaseTuner, "_remove_adapter_name_from_key")


def without_other_adapters(
    state: dict[str, torch.Tensor], adapter_name: str, adapter_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """``state`` less the tensors of the other adapters (as PEFT >= 0.20 leaves them out, by :func:`key_names_adapter`)."""
    others = [name for name in adapter_names if name != adapter_name]
    return {k: v for k, v in state.items() if not any(key_names_adapter(k, n) for n in others)}


# The per-adapter dicts a MoPE model's tensors live in (the layers', the schedule's, PEFT's heads): the part of a
# key after one of them is an adapter's name.
ADAPTER_DICTS = ("mope_experts", "mope_router", "mope_schedule", "modules_to_save")


def key_names_adapter(key: str, adapter_name: str) -> bool:
    """Whether a state-dict key belongs to ``adapter_name``: the name follows one of :data:`ADAPTER_DICTS`.

    Not any dotted part, as PEFT's own filter has it: an adapter named like a module ('mlp', '0') took
    every adapter's tensors of that module for its own.
    """
    return any(f".{where}.{adapter_name}." in f".{key}." for where in ADAPTER_DICTS)


# Whole-FFN experts' projections: their keys hold the adapter's name inside, "mope_experts.<name>.down.lora_A".
FFN_KEY = re.compile(r"(^|\.)mope_experts\.([^.]+)\.((?:gate|up|down)\.[^.]+)$")


def without_ffn_name(key: str) -> str:
    """A whole-FFN expert key without the adapter name inside it (``mope_experts.default.down.lora_A`` ->
    ``mope_experts.down.lora_A``), as bundles written by PEFT < 0.21 or before mope took it out hold it; any other key
    as it is. Such a bundle loaded only under the adapter name it was saved with."""
    return FFN_KEY.sub(r"\1mope_experts.\3", key)


def first_collision(places: Iterable[tuple[str, str]]) -> str | None:
    """Two file keys of ``places`` (file key, the tensor it loads into) that load into one tensor, or None: a whole-FFN
    key saved with and without the adapter name, or a key with the adapter's name beside the same key without it."""
    seen: dict[str, str] = {}
    for key, place in places:
        if place in seen:
            return f"'{seen[place]}' and '{key}' both load into '{place}'"
        seen[place] = key
    return None


def saved_key(key: str, adapter_name: str) -> str:
    """The name a bundle holds ``key`` of ``adapter_name`` under (whole-FFN keys compared by :func:`without_ffn_name`):
    a head's keys without ``modules_to_save.<name>.`` (``classifier.dense.weight`` in RoBERTa's nested head), else
    the adapter's name taken out where its key format puts it, at the end or second to last
    (``mope_router.default.weight`` -> ``mope_router.weight``), or inside (``mope_experts.down.lora_A``)."""
    if f".modules_to_save.{adapter_name}." in f".{key}":  # a head PEFT trains whole: its own state dict's keys
        return key.replace(f"modules_to_save.{adapter_name}.", "")
    ffn = FFN_KEY.search(key)
    if ffn is not None and ffn.group(2) == adapter_name:
        return without_ffn_name(key)
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, suffix = key.rpartition(".")
    return f"{head.removesuffix(f'.{adapter_name}')}.{suffix}"
