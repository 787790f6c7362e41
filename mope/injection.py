"""Injecting an adapter safely: the checks made before any module is wrapped, and snapshots that undo a wrap.

``MoPEModel.inject_adapter`` and ``mope.load_mope`` take a :class:`ModelSnapshot` first and restore it on
any error, so a failed wrap or load leaves the model exactly as it was (modules, flags, hooks). The checks
here name what PEFT would otherwise report misleadingly or not at all ('all-linear' matching nothing, or
leaving quantized layers out; a forward on meta weights; a deleted last adapter).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from torch import nn
from transformers import PreTrainedModel

from .base_layers import quantizer_of
from .ffn_layer import MoPEFFNLayer
from .layer import MoPELayer, supported_base_layer
from .peft_compat import ADAPTER_DICTS
from .routing.schedule import detach_schedule


def check_adapter_name(name: Any) -> None:
    """An adapter's name is a key of mope's per-adapter dicts and a folder name in saves: refuse one that is not."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"adapter name {name!r}: give a non-empty string")
    if "/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name):
        # PEFT saves a named adapter to os.path.join(save_directory, name): '/abs' and 'x/' wrote elsewhere
        raise ValueError(
            f"adapter name {name!r}: a name may not hold '/' or '\\' or start with '.' (saves use it as a folder)"
        )
    if name in ADAPTER_DICTS or name in ("lora_A", "lora_B") or hasattr(nn.ModuleDict(), name):
        # a dict's name: a key then reads as another adapter's ('mope_experts.lora_A' of adapter 'mope_experts' as
        # adapter 'lora_A'); 'lora_A'/'lora_B': PEFT < 0.21 takes a key's trailing tensor name for the adapter's
        raise ValueError(f"adapter name {name!r}: mope's modules use that name themselves; choose another")


def warn_generate_without_task_type(config: Any, model: nn.Module, adapter_name: str) -> None:
    """A model that generates, adapted with no ``task_type``: PEFT's plain ``PeftModel.generate`` skips mope's."""
    can_generate = getattr(model, "can_generate", None)
    if config.task_type is None and callable(can_generate) and can_generate():
        warnings.warn(
            f"MoPE adapter '{adapter_name}' has no task_type, and PEFT's PeftModel.generate then calls the base "
            "model's generate directly, not mope's: mope_task_ids do not reach the steps, sequence-level decisions "
            "are not the prompt's, capacity may drop tokens, and cached and uncached generation can differ. Give "
            "task_type='CAUSAL_LM' (or 'SEQ_2_SEQ_LM') to generate with this model.",
            stacklevel=4,
        )


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The output heads PEFT's 'all-linear' leaves out: the output embedding, a classification head."""
    if not isinstance(model, PreTrainedModel):
        return []
    heads = [model.get_output_embeddings()] + [getattr(model, name, None) for name in SEQ_CLS_HEAD_NAMES]
    return [head for head in heads if head is not None]


def check_all_linear_finds_layers(config, model: nn.Module) -> None:
    """'all-linear' on a model with no linear layer but its heads: say so (PEFT says no targets were passed)."""
    target = config.target_modules
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    heads = {id(head) for head in head_modules(model)}
    skipped = [
        (name, quantizer)
        for name, m in model.named_modules()
        if not isinstance(m, nn.Linear) and id(m) not in heads and (quantizer := quantizer_of(m)) is not None
    ]
    if skipped:  # PEFT's expansion picks nn.Linear / Conv1D only: these would be left out without a word
        raise ValueError(
            f"MoPEConfig.target_modules='all-linear' would leave out {len(skipped)} {skipped[0][1]} quantized layers "
            f"(e.g. '{skipped[0][0]}'), which mope cannot wrap. Quantize the base with bitsandbytes "
            "(transformers.BitsAndBytesConfig) instead, or name the modules to adapt in target_modules."
        )
    adaptable = (m for m in model.modules() if supported_base_layer(m) or isinstance(m, MoPELayer))
    if not any(id(m) not in heads for m in adaptable):
        raise ValueError(
            f"MoPEConfig.target_modules='all-linear' matches nothing: {type(model).__name__} has no nn.Linear or "
            "Conv1D layer besides its output head. Name the modules to adapt in target_modules."
        )


def include_mope_layers_in_all_linear(config, model: nn.Module) -> None:
    """Expand ``target_modules='all-linear'`` so that layers already wrapped by MoPE count as linear.

    PEFT's expansion recognises an already adapted layer by "Linear" in its class name (LoRA's
    naming); ``MoPELayer`` wraps both ``nn.Linear`` and ``Conv1D`` under one name, so without
    this a second 'all-linear' adapter on a MoPE model matches no module at all. The heads PEFT
    leaves out stay out. A whole-FFN layer wraps a block, whose projections no other adapter can
    reach: 'all-linear' is refused there (it gave whole-FFN experts on the block).
    """
    target = config.target_modules
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    blocks = [name for name, m in model.named_modules() if isinstance(m, MoPEFFNLayer)]
    if blocks:
        raise ValueError(
            f"MoPEConfig.target_modules='all-linear' cannot reach the projections inside the whole-FFN layers of "
            f"this model's adapters ({', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''}): name the "
            "modules instead, e.g. ['q_proj', 'v_proj'], and the block ('mlp') for whole-FFN experts; nothing "
            "was changed."
        )
    heads = {id(head) for head in head_modules(model)}
    wrapped = {name for name, m in model.named_modules() if isinstance(m, MoPELayer) and id(m) not in heads}
    _maybe_include_all_linear_layers(config, model)
    # a task head is trained whole (modules_to_save): it takes no experts (PEFT's expansion kept TOKEN_CLS's and
    # QUESTION_ANS's, and wrapping it whole failed after the injection)
    saved = saved_whole(config)
    config.target_modules = {name for name in config.target_modules if not ends_with_any(name, saved)} | wrapped


# The heads PEFT's task classes add to modules_to_save after the injection (PeftModelForTokenClassification, ...).
TASK_HEADS = {
    "SEQ_CLS": tuple(SEQ_CLS_HEAD_NAMES),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def saved_whole(config) -> set[str]:
    """The names of the modules trained whole: ``modules_to_save`` and the head the task type adds to it."""
    task = getattr(config.task_type, "value", config.task_type)
    return set(config.modules_to_save or ()) | set(TASK_HEADS.get(task, ()))


def ends_with_any(name: str, keys: set[str]) -> bool:
    """PEFT's modules_to_save rule: a module whose name ends with one of ``keys``."""
    return any(name.endswith(key) for key in keys)


def refuse_targets_saved_whole(config, model: nn.Module, tuner: BaseTuner) -> None:
    """A module trained whole (:func:`saved_whole`) cannot also take experts (PEFT failed with a TypeError naming
    no field once the injection had run, leaving the model wrapped)."""
    saved = saved_whole(config)
    if config.target_modules is None or not saved:
        return
    for name, module in model.named_modules():
        if not name or not ends_with_any(name, saved) or not supported_base_layer(module):
            continue
        found = tuner._check_target_module_exists(config, name)
        if found and not isinstance(found, _ExcludedModule):
            raise ValueError(
                f"MoPEConfig.target_modules matches '{name}', which is trained whole (modules_to_save, or the head "
                f"task_type={getattr(config.task_type, 'value', config.task_type)!r} adds to it): leave it out of "
                "target_modules; nothing was changed."
            )


def refuse_nested_targets(config, model: nn.Module, tuner: BaseTuner) -> None:
    """Refuse targets inside another target or inside a whole-FFN layer: a block's experts wrap it whole, so its
    projections cannot take other experts (``['mlp', 'down_proj']`` failed with an AttributeError half-way through
    the injection; a later adapter's ``down_proj`` was "not found", as PEFT skips an adapter's internals)."""

    if config.target_modules is None:  # the model type's defaults (attention projections), filled in later
        return

    def targeted(name: str) -> bool:
        found = tuner._check_target_module_exists(config, name)
        return bool(found) and not isinstance(found, _ExcludedModule)

    adapted = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outer = None
    for name, module in model.named_modules():
        if isinstance(module, MoPEFFNLayer):  # its projections, by the names they had before it wrapped them
            inner = next(
                (f"{name}.{i}" for i, _ in module.base_layer.named_modules() if i and targeted(f"{name}.{i}")), None
            )
            if inner is not None:
                raise ValueError(
                    f"MoPEConfig.target_modules reaches {inner}, which is inside the whole-FFN layer of adapter(s) "
                    f"{list(module.mope_experts)} at '{name}': its projections cannot take other experts. Target "
                    f"'{name.rsplit('.', 1)[-1]}' (whole-FFN experts) or modules outside it; nothing was changed."
                )
        if not name or any(name.startswith(f"{layer}.") for layer in adapted) or not targeted(name):
            continue
        if outer is not None and name.startswith(f"{outer}."):
            raise ValueError(
                f"MoPEConfig.target_modules matches both '{outer}' and '{name}' inside it: experts wrap a module "
                "whole, so target one of them; nothing was changed."
            )
        outer = name


# The forward hooks of a module: the tuner's own two, and e.g. gradient checkpointing's input-embedding hook.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def describe_unfit_weights(own: dict[str, tuple], given: dict[str, tuple]) -> str | None:
    """What keeps tensors ``given`` for an adapter from replacing its ``own`` exactly (names -> shapes), or None."""
    unexpected = [key for key in given if key not in own]
    wrong = [key for key in given if key in own and given[key] != own[key]]
    missing = [key for key in own if key not in given]
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} of the {len(given)} tensors given have no place in it (e.g. '{unexpected[0]}')"
        )
    if wrong:
        key = wrong[0]
        problems.append(f"{len(wrong)} have other shapes (e.g. '{key}' is {list(given[key])}, not {list(own[key])})")
    if missing:
        problems.append(f"{len(missing)} of its {len(own)} tensors are not given (e.g. '{missing[0]}')")
    return "; ".join(problems) or None


def entry_of(state: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The entry of a PeftModel's ``state`` a loaded tensor's ``key`` names, with or without PEFT's prefix, or None."""
    prefix = "base_model.model."
    for name in (key, prefix + key, key.removeprefix(prefix)):
        if name in state:
            return state[name]
    return None


def has_input_embeddings(model: nn.Module) -> bool:
    """Whether ``model.get_input_embeddings()`` answers (transformers raises NotImplementedError for Wav2Vec2,
    CLIPModel, ConvNext, ...)."""
    try:
        return model.get_input_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def embedding_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``'<name>.'`` of the model's input and output embedding modules (without PEFT's prefix), whose tensors PEFT's
    ``save_embedding_layers`` writes with an adapter (of a ``modules_to_save`` lm_head also the wrapper's own, which
    no model has: PEFT skips them on load)."""
    prefix = "base_model.model."
    embeddings = []
    for name in ("get_input_embeddings", "get_output_embeddings"):
        with contextlib.suppress(AttributeError, NotImplementedError):
            embeddings.append(getattr(model, name)())
    return tuple(
        f"{name.removeprefix(prefix)}."
        for name, module in model.named_modules()
        if any(module is e for e in embeddings)
    )


class ModelSnapshot:
    """What wrapping a model in PEFT can change on it, so that a failed wrap or load leaves it as it was.

    The module tree (targeted modules are replaced by MoPE layers, ``modules_to_save`` by PEFT's wrappers),
    requires_grad and train/eval flags, forward hooks, the ``peft_config`` attribute BaseTuner sets on the
    model and ``config.pretraining_tp`` (PeftModel sets it to 1). Only references and flags are kept.
    """

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self.model = model
        self.children = [(module, dict(module._modules)) for module in modules]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(module, module.training) for module in modules]
        self.hooks = [(module, name, dict(getattr(module, name))) for module in modules for name in HOOK_DICTS]
        self.peft_config = vars(model).get("peft_config")
        self.pretraining_tp = getattr(getattr(model, "config", None), "pretraining_tp", None)

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad = requires_grad
        for module, training in self.training:
            module.training = training
        for module, name, hooks in self.hooks:
            getattr(module, name).clear()
            getattr(module, name).update(hooks)
        if self.peft_config is not None:
            self.model.peft_config = self.peft_config
        elif "peft_config" in vars(self.model):
            del self.model.peft_config
        if self.pretraining_tp is not None:
            self.model.config.pretraining_tp = self.pretraining_tp


class InjectionSnapshot(ModelSnapshot):
    """A :class:`ModelSnapshot` plus what injecting one adapter changes in the tuner and in layers it had wrapped."""

    def __init__(self, model: nn.Module, tuner: BaseTuner) -> None:
        super().__init__(model)
        self.tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.tuner = tuner
        self.targeted_module_names = list(tuner.targeted_module_names)

    def restore_adapter(self, adapter_name: str) -> None:
        for layer in self.tuner_layers:  # before the module tree: delete_adapter also clears the layer's settings
            if adapter_name in getattr(layer, "mope_experts", {}):
                layer.delete_adapter(adapter_name)
        self.restore()
        self.tuner.targeted_module_names[:] = self.targeted_module_names
        detach_schedule(self.tuner, adapter_name)


class AdapterConfigs(dict):
    """The tuner's ``peft_config`` table (adapter name -> config): a missing name's KeyError says what exists.

    PeftModel.forward looks its active adapter up here; after ``delete_adapter`` removed the only
    adapter, a plain dict said nothing but ``KeyError: 'default'``.
    """

    def __missing__(self, name: str) -> Any:
        if self:
            listed = ", ".join(repr(existing) for existing in self)
            fix = f"select one of them with set_adapter (adapters: {listed})"
        else:
            fix = (
                "no adapter is left (delete_adapter removed the last one): add one with add_adapter or "
                "load_adapter, or run the base model alone (get_base_model())"
            )
        raise KeyError(f"MoPE adapter {name!r} does not exist; {fix}")


def meta_weights_error(model: nn.Module) -> ValueError | None:
    """The error for a model that has weights on the meta device (shapes, no values), or None.

    Only the adapter's (an adapter injected with ``low_cpu_mem_usage=True`` before its tensors
    load), or the model's own (built under ``torch.device('meta')`` or ``init_empty_weights``). A
    model dispatched or offloaded by accelerate (``hf_device_map``, its modules' ``_hf_hook``) keeps
    offloaded weights there on purpose: None.
    """
    if getattr(model, "hf_device_map", None) is not None or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return None
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if not meta:
        return None
    base = next((name for name in meta if ".mope_" not in name), None)
    if base is None:
        return ValueError(
            f"MoPE adapter weights are on the meta device (e.g. '{meta[0]}'): an adapter injected with "
            "low_cpu_mem_usage=True has shapes but no values until its tensors load (PeftModel.from_pretrained, "
            "load_adapter, set_peft_model_state_dict(..., low_cpu_mem_usage=True)). Load them before calling the model."
        )
    return ValueError(
        f"{type(model).__name__} has weights on the meta device (e.g. '{base}'): they have shapes but no values, "
        "as in a model built under torch.device('meta') or accelerate.init_empty_weights(), so it cannot run. "
        "Load its weights first (from_pretrained, or model.to_empty(device=...) then load_state_dict)."
    )


@contextlib.contextmanager
def naming_meta_weights(model: nn.Module) -> Iterator[None]:
    """Re-raise an error of a model whose weights are on the meta device as one that says so.

    torch's own error names no weight (on CPU: "unknown device type for autocast"). Checked only
    after an error, so a forward pays nothing.
    """
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        meta = meta_weights_error(model)
        if meta is None:
            raise
        raise meta from error
