"""``MoPEModel``: PEFT's ``BaseTuner`` for mixtures of parameter-efficient experts.

Injection wraps each targeted module in a :class:`~mope.layer.MoPELayer`. Two hooks on the
wrapped model connect the layers to the batch: a pre-hook starts a
:class:`~mope.routing.context.ForwardCall` with the routing inputs (attention masks, token, task
and group ids), a post-hook ends it and sums the layers' recorded router losses onto the output as
``aux_loss`` (and into ``loss``). Nothing of PEFT is patched: mope's own inputs
(``mope_task_ids``, ``group_ids``) are names PEFT passes on untouched, and the pre-hook takes them
out of the call before the base model sees them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_peft_model_state_dict
from torch import nn
from transformers.integrations import PeftAdapterMixin, is_deepspeed_zero3_enabled
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .bundles import describe_bad_values, describe_mismatch
from .bundles.files import BundleHeader
from .config import lists_module, pattern_matches
from .ffn_layer import layer_class_for
from .injection import (
    AdapterConfigs,
    InjectionSnapshot,
    check_adapter_name,
    check_all_linear_finds_layers,
    describe_unfit_weights,
    embedding_prefixes,
    entry_of,
    has_input_embeddings,
    include_mope_layers_in_all_linear,
    meta_weights_error,
    naming_meta_weights,
    refuse_nested_targets,
    refuse_targets_saved_whole,
    warn_generate_without_task_type,
)
from .integrations.deepspeed import gather_routers_with_their_layers
from .layer import BlockLink, MoPELayer
from .losses import AUX_LOSSES, check_losses_reach_routers
from .outputs import accumulation_share, attach_aux_loss, declared_outputs, with_aux_loss_field
from .peft_compat import FFN_KEY, first_collision, key_names_adapter, saved_key, without_ffn_name
from .routing import ROUTERS
from .routing.context import (
    CAPTURED_INPUTS,
    RoutingContext,
    complete_inputs,
    generate_with_routing,
    holds_tokens,
    keep_calls_in_recomputation,
    refuse_packed_rows,
    release_recomputation,
)
from .routing.schedule import (
    advance_schedules,
    attach_schedule,
    bind_schedule,
    detach_schedule,
    load_saved_step,
    schedules_of,
    tuner_by_hook,
)

# In encoder-decoder models, decoder modules see decoder tokens, except the key/value
# projections of cross-attention, which see the encoder's tokens.
CROSS_ATTENTION_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj|crossattention\.self\.(key|value))$")
AUX_LOSS_BY_NAME = {loss.name: loss for loss in AUX_LOSSES}
# transformers' decoder-only LM classes (their loss is normalised over Trainer's num_items_in_batch)
CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
# Task types whose PEFT class wraps the model for generation (it reads prepare_inputs_for_generation).
GENERATING_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def refuse_frozen_identity(config) -> None:
    """Frozen experts that start as the identity never leave it: the model stays the base whatever trains. A saved
    config (``inference_mode=True``, as PEFT saves it) brings its experts' weights, whichever loader reads it."""
    if config.freeze_experts and config.init_weights and config.bundle is None and not config.inference_mode:
        raise ValueError(
            "MoPEConfig.freeze_experts=True with init_weights=True: every expert starts as the identity and never "
            "trains, so the model would stay the base model. Load trained experts (PeftModel.from_pretrained, "
            "mope.from_lora_adapters), or set init_weights=False (random experts) or freeze_experts=False."
        )


def caller_frame(code) -> Any:
    """The innermost frame on the call stack that runs ``code``, or None."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def in_peft_from_pretrained() -> bool:
    """Whether PEFT's ``PeftModel.from_pretrained`` (or an ``AutoPeftModel``'s) is on the call stack: its
    injection's tensors come next, and its PeftModel is never returned if they are refused."""
    return caller_frame(PeftModel.from_pretrained.__func__.__code__) is not None


def transformers_bundle_folder() -> tuple[str, bool] | None:
    """The local bundle folder transformers' own ``model.load_adapter`` is loading when it is the caller, and
    whether it read the config from there (not given ``peft_config=``); None for a Hub id or ``adapter_state_dict``.

    It builds the config with PEFT's ``PeftConfig.from_pretrained`` (no upgrade, unknown keys dropped, no bundle
    header) and loads the tensors itself after the injection, where no mope code runs and a failure leaves the
    adapter injected: so the injection reads the folder and checks it first.
    """
    frame = caller_frame(PeftAdapterMixin.load_adapter.__code__)
    if frame is None or frame.f_locals.get("adapter_state_dict") is not None:
        return None
    source = frame.f_locals.get("peft_model_id")
    if source is None:
        return None
    # where transformers reads the tensors from: its load config's download kwargs (adapter_kwargs are merged in
    # when it reads the config too; from_pretrained(..., subfolder=...) puts the subfolder there)
    downloads = getattr(frame.f_locals.get("load_config"), "download_kwargs", None) or {}
    subfolder = downloads.get("subfolder") or ""
    folder = os.path.normpath(os.path.join(os.fspath(source), subfolder))
    return (folder, "adapter_config_file" in frame.f_locals) if os.path.isdir(folder) else None


def read_bundle_for_transformers(config, folder: str, config_from_file: bool) -> None:
    """Give a config that transformers' ``load_adapter`` built what ``MoPEConfig.from_pretrained`` checks and
    reads: the tensor header and values, and (from the folder's config file) its unknown keys refused, a newer
    version refused, and an older version's upgrade. ``inference_mode`` stays as transformers set it."""
    if not config_from_file:
        config.bundle = BundleHeader.read(folder)
    else:
        saved = type(config).from_pretrained(folder)
        saved.inference_mode = config.inference_mode
        vars(config).update(vars(saved))
    refuse_named_ffn_keys(config.bundle)


# transformers' load_adapter maps a bundle's keys with PEFT's build_peft_weight_mapping (transformers 5.25 does; 5.0
# maps them itself), which takes a whole-FFN key that holds the adapter name for a tensor the model does not have
PEFT_MAPS_TRANSFORMERS_KEYS = "build_peft_weight_mapping" in PeftAdapterMixin.load_adapter.__code__.co_names


@functools.cache
def loss_reads_items(model_class: type) -> bool:
    """Whether a transformers causal LM class computes its loss with ``loss_function`` (which reads Trainer's
    ``num_items_in_batch``), not a plain CrossEntropyLoss mean (BartForCausalLM, XLNet, ...). Once per class: the
    training forward asks."""
    forward = inspect.unwrap(model_class.forward)
    return model_class.__name__ in CAUSAL_LM_CLASSES and "loss_function" in forward.__code__.co_names


def refuse_named_ffn_keys(header: BundleHeader) -> None:
    """transformers' ``load_adapter`` reports a whole-FFN bundle's keys that hold the adapter name (as PEFT < 0.21
    and older mope versions wrote them) as unexpected, and loads the bundle without its experts: refused there."""
    named = [key for key in header.tensor_shapes if without_ffn_name(key) != key]
    if named and PEFT_MAPS_TRANSFORMERS_KEYS:
        raise ValueError(
            f"{header.tensor_file}: {len(named)} whole-FFN expert tensors hold their adapter's name (e.g. "
            f"'{named[0]}', as PEFT < 0.21 and older mope versions wrote them), which transformers' "
            "model.load_adapter does not load; nothing was loaded. Load this bundle with PeftModel.from_pretrained "
            "or mope.load_mope."
        )


def forget_refused_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo the injection of an adapter whose bundle's tensors were then refused: the model is as before.

    ``load_adapter`` under a new name deletes it again; ``from_pretrained``'s only adapter (that PeftModel is
    never returned) gives the base model back as it was before the injection, hooks included (they kept a retry
    on the same base from loading: the model seemed to hold a MoPE adapter already).
    """
    tuner = model.base_model if isinstance(model, PeftModel) else model
    snapshot = getattr(tuner, "awaiting_tensors", {}).pop(adapter_name, None)
    if snapshot is None:
        return
    if isinstance(model, PeftModel) and len(model.peft_config) > 1:
        model.delete_adapter(adapter_name)
    else:
        snapshot.restore_adapter(adapter_name)


def refuse_second_tuner(model: nn.Module) -> None:
    """One MoPE tuner per model: each keeps its own routing context, config table and hooks, so adapters added by a
    second one (transformers' ``load_adapter`` twice, ``get_peft_model`` twice on one base) counted the aux loss
    twice, lost their task ids to the first one's hook, and failed in training (the first one's table lacks them)."""
    earlier = tuner_by_hook(model)
    if earlier is None:
        return
    names = ", ".join(repr(name) for name in earlier.peft_config)
    raise ValueError(
        f"This model already holds MoPE adapters ({names}) from an earlier injection (transformers' "
        "model.load_adapter/add_adapter, PEFT's inject_adapter_in_model, or get_peft_model on this same base model); "
        "a second injection would keep its adapters' aux losses, task ids and router schedules apart from the "
        "first's. Hold several MoPE adapters in one PeftModel: PeftModel.from_pretrained(base, first_bundle), then "
        "model.load_adapter(second_bundle, adapter_name=...); or unload() the first. Nothing was changed."
    )


class MoPEModel(BaseTuner):
    """Creates a mixture of parameter-efficient experts on a pretrained model (use via ``get_peft_model``)."""

    prefix: str = "mope_"
    tuner_layer_cls = MoPELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    # also on the class: a model pickled before they existed reads these (set per tuner in _pre_injection_hook)
    adapters_enabled = True
    meta_experts = False
    warned_unread_task_ids = False

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        refuse_second_tuner(model)  # before BaseTuner puts the new config into the model's table
        super().__init__(model, *args, **kwargs)

    # injection ---------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        self.peft_config = AdapterConfigs(self.peft_config)  # BaseTuner then gives the model this same table
        self.routing_context = RoutingContext()
        self.routing_context.encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        self.hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forward_parameter_names: list[str] | None = None
        # adapters injected from a bundle whose tensors are not loaded yet: removed again if they are refused
        self.awaiting_tensors: dict[str, InjectionSnapshot] = {}
        self.checkpointed_layers: list[nn.Module] | None = None
        self.adapters_enabled = True  # False inside PeftModel.disable_adapter(): the routers do not run
        self.meta_experts = False  # an adapter was injected with low_cpu_mem_usage: checked until its tensors load
        self.warned_unread_task_ids = False

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        self.hook_handles = [
            model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            model.register_forward_hook(self._attach_aux_loss, always_call=True),  # a forward that raised too
        ]
        for output_type in declared_outputs(model):
            with_aux_loss_field(output_type)
        if is_deepspeed_zero3_enabled():  # Trainer / TRL / accelerate under ZeRO-3
            gather_routers_with_their_layers(model)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for layer in model.modules():
            if isinstance(layer, MoPELayer):
                layer.keep_frozen()  # PEFT 0.19 only

    def _prepare_adapter_config(self, peft_config, model_config: dict) -> Any:
        model_type = model_config.get("model_type")
        loaded_from = peft_config.bundle.folder if peft_config.bundle is not None else None
        task = getattr(peft_config.task_type, "value", peft_config.task_type)
        if task in GENERATING_TASK_TYPES and not hasattr(self.model, "prepare_inputs_for_generation"):
            made = f"MoPE bundle '{loaded_from}' was made" if loaded_from else "This MoPEConfig is"
            raise ValueError(
                f"{made} for task_type={task!r}, which PEFT wraps in a generating model class, but "
                f"{type(self.model).__name__} cannot generate (it has no prepare_inputs_for_generation). Load it "
                "onto a model of that task, or set MoPEConfig.task_type to this model's (e.g. 'SEQ_CLS')."
            )
        if peft_config.target_modules is None:
            defaults = self.target_module_mapping.get(model_type)
            if defaults is None:
                raise ValueError(
                    f"MoPEConfig.target_modules is None and mope knows no default targets for model_type "
                    f"'{model_type}'; set target_modules (e.g. 'all-linear')."
                )
            peft_config.target_modules = set(defaults)
        if loaded_from and peft_config.base_model_type and model_type and peft_config.base_model_type != model_type:
            raise ValueError(
                f"MoPE bundle '{loaded_from}' was made for a '{peft_config.base_model_type}' model "
                f"(MoPEConfig.base_model_type), but this model is '{model_type}'."
            )
        if model_type and model_type != "custom":
            peft_config.base_model_type = model_type
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """PEFT's injection, made all-or-nothing: on any error the model is restored, then it re-raises."""
        check_adapter_name(adapter_name)
        snapshot = InjectionSnapshot(model, self)
        config = self.peft_config[adapter_name]
        source = transformers_bundle_folder() if config.bundle is None else None
        from_transformers = source is not None
        try:
            if from_transformers:
                read_bundle_for_transformers(config, *source)
            self.peft_config[adapter_name].validate()  # fields assigned since the config was made
            refuse_frozen_identity(self.peft_config[adapter_name])
            warn_generate_without_task_type(self.peft_config[adapter_name], model, adapter_name)
            attach_schedule(self, self.peft_config[adapter_name], adapter_name)  # before: the bundle check counts it
            check_all_linear_finds_layers(self.peft_config[adapter_name], model)
            include_mope_layers_in_all_linear(self.peft_config[adapter_name], model)
            refuse_nested_targets(self.peft_config[adapter_name], model, self)
            refuse_targets_saved_whole(self.peft_config[adapter_name], model, self)
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
            self._check_patterns_used(adapter_name)
            self._link_blocks(adapter_name)
            bind_schedule(self, adapter_name)
            self._check_bundle_fits(adapter_name)
            if from_transformers:
                load_saved_step(self, adapter_name, config.bundle.tensor_file)
            if not from_transformers and (config.bundle is not None or in_peft_from_pretrained()):  # tensors next
                self.awaiting_tensors[adapter_name] = snapshot
            # low_cpu_mem_usage (or PeftModel's init_empty_weights): shapes, no values until the tensors load
            self.meta_experts = self.meta_experts or any(p.is_meta for p in self.model.parameters())
        except Exception:
            snapshot.restore_adapter(adapter_name)
            raise
        finally:
            if from_transformers and not source[1]:  # the caller's own config (peft_config=): no lasting bundle link
                config.bundle = None

    def _check_patterns_used(self, adapter_name: str) -> None:
        """Every per-module pattern must match an adapted module: a typo would silently do nothing."""
        config = self.peft_config[adapter_name]
        adapted = [
            name
            for name, m in self.model.named_modules()
            if isinstance(m, MoPELayer) and adapter_name in m.mope_experts
        ]
        if not adapted:  # PEFT < 0.21 checks this only for the first adapter
            raise ValueError(
                f"Target modules {config.target_modules} not found in the base model. "
                "Please check the target modules and try again."
            )
        for field_name in ("num_experts_pattern", "top_k_pattern"):
            for pattern in getattr(config, field_name):
                if not any(pattern_matches(pattern, name) for name in adapted):
                    raise ValueError(
                        f"MoPEConfig.{field_name} key {pattern!r} matches none of the {len(adapted)} adapted modules "
                        f"(e.g. {', '.join(adapted[:3])})"
                    )
            table = getattr(config, field_name)
            first = {next((p for p in table if pattern_matches(p, name)), None) for name in adapted}
            for pattern in table:
                if pattern not in first:  # an earlier key takes every module it matches (PEFT's first-match rule)
                    warnings.warn(
                        f"MoPEConfig.{field_name} key {pattern!r} applies to no module: an earlier key matches every "
                        "module it matches (the first matching key wins)",
                        stacklevel=2,
                    )
        targets = config.feedforward_modules
        if targets and not any(config.is_feedforward(name) for name in adapted):
            raise ValueError(
                f"MoPEConfig.feedforward_modules={targets!r} matches none of the adapted modules "
                f"(e.g. {', '.join(adapted[:3])})"
            )
        # each entry of a list: a typo beside one that matches was silent; a warning, as a list written for several
        # architectures ('down_proj', 'fc2', BERT's 'output.dense') names modules one model does not have
        for entry in [] if isinstance(targets, str) else sorted(targets or ()):
            if not any(lists_module([entry], name) for name in adapted):
                warnings.warn(
                    f"MoPEConfig.feedforward_modules entry {entry!r} matches none of adapter '{adapter_name}''s "
                    "adapted modules; it scales nothing",
                    stacklevel=2,
                )

    def _link_blocks(self, adapter_name: str) -> None:
        """Block-level routing: keep the router of each block's first adapted module, drop the others'."""
        config = self.peft_config[adapter_name]
        if not config.router_blocks:
            return
        layers = [
            (n, m) for n, m in self.model.named_modules() if isinstance(m, MoPELayer) and adapter_name in m.mope_experts
        ]
        blocks = [
            n for n, _ in self.model.named_modules() if n and any(pattern_matches(p, n) for p in config.router_blocks)
        ]
        for pattern in config.router_blocks:  # each one: a typo beside a pattern that links was silent
            if not any(pattern_matches(pattern, b) and any(n.startswith(b + ".") for n, _ in layers) for b in blocks):
                warnings.warn(  # not refused: a list shared by adapters of different targets is fine
                    f"MoPEConfig.router_blocks entry {pattern!r} of adapter '{adapter_name}' matches no module that "
                    "contains its adapted modules; it links nothing",
                    stacklevel=2,
                )
        linked = 0
        for block in blocks:
            members = [m for n, m in layers if n.startswith(block + ".")]
            if not members:
                continue
            leader = members[0]
            for member in members:
                if member.mope_settings[adapter_name] != leader.mope_settings[adapter_name]:
                    raise ValueError(
                        f"MoPEConfig.router_blocks: modules '{leader.module_name}' and '{member.module_name}' of "
                        f"block '{block}' resolve to different num_experts/top_k; a shared router needs equal ones"
                    )
                if member.mask_key != leader.mask_key:  # cross-attention: the query sees decoder tokens, k/v encoder's
                    raise ValueError(
                        f"MoPEConfig.router_blocks: modules '{leader.module_name}' and '{member.module_name}' of block "
                        f"'{block}' see different tokens ({leader.mask_key} and {member.mask_key}), so one routing "
                        "cannot serve both; leave the block out or target the modules of one token stream"
                    )
                member.mope_block[adapter_name] = BlockLink(block, leader)
                if member is not leader:
                    del member.mope_router[adapter_name]
                linked += 1
        if not linked:
            raise ValueError(
                f"MoPEConfig.router_blocks={config.router_blocks!r} matches no module that contains adapted modules"
            )

    def _check_bundle_fits(self, adapter_name: str) -> None:
        """Compare a loaded config's bundle header with the tensors the injected model expects."""
        config = self.peft_config[adapter_name]
        if config.bundle is None:
            return
        shapes = config.bundle.tensor_shapes
        problem = first_collision((key, without_ffn_name(key)) for key in shapes)
        if problem is not None:
            raise ValueError(f"{config.bundle.tensor_file}: {problem}; a bundle holds each tensor once")
        found = {without_ffn_name(key): shape for key, shape in shapes.items()}
        # the adapter's own tensors under their saved names (not get_peft_model_state_dict's, whose filter drops a
        # module's tensors where another adapter is named like a part of its path: '0', 'mlp')
        expected = {
            "base_model." + saved_key(key, adapter_name): tuple(value.shape)
            for key, value in self.state_dict().items()
            if key_names_adapter(key, adapter_name)
        }
        optional = {}
        if has_input_embeddings(self.model):  # PEFT asks for them, and Wav2Vec2, CLIPModel, ConvNext raise
            with_embeddings, without = (
                get_peft_model_state_dict(self, adapter_name=adapter_name, save_embedding_layers=save)
                for save in (True, False)
            )
            optional = {f"base_model.{k}": tuple(v.shape) for k, v in with_embeddings.items() if k not in without}
        # PEFT also saves the base weights of a targeted (or resized) embedding / lm_head: allowed, not required
        found = {key: shape for key, shape in found.items() if key in expected or optional.get(key) != shape}
        problem = describe_mismatch(config.bundle.tensor_file, expected, found)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """PEFT >= 0.21's key of a bundle for a model key: whole-FFN experts' too lose the name inside their key
        (``mope_experts.<name>.down.lora_A``), so their bundles load under any adapter name (see ``saved_key``)."""
        if saved_key(key, adapter_name) != key and FFN_KEY.search(key) is not None:
            return saved_key(key, adapter_name)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Refuse a bundle's tensors that do not fit the adapter, before any is loaded (PEFT >= 0.21 calls this).

        ``load_adapter(path, adapter_name=<a loaded adapter's name>)`` loads into that adapter without
        reading the bundle's config, and PEFT loads the tensors that fit and drops the others without
        a word. A new adapter's bundle was already checked against the model (``_check_bundle_fits``)
        and its values read (``MoPEConfig.from_pretrained``), except one from the Hub or given with an
        explicit ``config=``: this check covers those too, values (NaN, dtypes, the step) included.
        """
        renamed = {without_ffn_name(key): key for key in state_dict}  # any name it was saved with
        places = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict={key: key for key in renamed}
        )  # the tensor each file key loads into -> that key
        remapped = {place: state_dict[renamed[key]] for place, key in places.items()}
        state = model.state_dict()
        own = {
            key: tuple(value.shape)
            for key, value in state.items()
            if cls.prefix in key and key_names_adapter(key, adapter_name)
        }
        refused = f"Cannot load these weights into MoPE adapter '{adapter_name}'; nothing was loaded"
        problem = first_collision((key, without_ffn_name(key)) for key in state_dict)
        if problem is None and len(places) < len(renamed):  # PEFT's mapping put two file keys in one place
            lost = next(key for key in renamed if key not in places.values())
            (place,) = super()._remap_adapter_state_dict_for_load(
                model=model, config=config, adapter_name=adapter_name, state_dict={lost: lost}
            )
            problem = f"'{renamed[places[place]]}' and '{renamed[lost]}' both load into '{place}'"
        if problem is None:
            problem = describe_unfit_weights(own, {k: tuple(v.shape) for k, v in remapped.items() if cls.prefix in k})
        # the tensors outside mope's modules: this adapter's heads, and PEFT's saved embeddings (whose keys without a
        # place are PEFT's own, a wrapped lm_head's 'modules_to_save.weight': it skips them); nothing else
        entries = {k: entry_of(state, k) for k in remapped if cls.prefix not in k}
        embeddings = embedding_prefixes(model)
        embedded = {k for k in entries if k.removeprefix("base_model.model.").startswith(embeddings)}
        strange = [k for k, entry in entries.items() if entry is None and k not in embedded]
        if problem is None and strange:
            problem = f"{len(strange)} tensors have no place in this model (e.g. '{strange[0]}')"
        resized = [k for k, entry in entries.items() if entry is not None and entry.shape != remapped[k].shape]
        if problem is None and resized:  # a head for another number of labels: torch refused it after the experts
            key = resized[0]
            problem = (
                f"{len(resized)} tensors have other shapes (e.g. '{key}' is {list(remapped[key].shape)}, "
                f"not {list(entries[key].shape)})"
            )
        base = [k for k in entries if k not in embedded and not key_names_adapter(k, adapter_name)]
        if problem is None and base:
            problem = f"{len(base)} tensors are the frozen base model's own weights (e.g. '{base[0]}')"
        advice = (
            f" If '{adapter_name}' was already loaded (load_adapter into an existing name keeps that adapter's "
            f"config and only replaces tensors), load the bundle under a new adapter_name, or "
            f"delete_adapter('{adapter_name}') first; otherwise the bundle was made for another model or config."
        )
        if problem is None:
            problem = describe_bad_values(remapped.items())
            advice = ""
        if problem is not None:
            forget_refused_adapter(model, adapter_name)
            raise ValueError(f"{refused}: {problem}.{advice}")
        tuner = model.base_model if isinstance(model, PeftModel) else model
        getattr(tuner, "awaiting_tensors", {}).pop(adapter_name, None)
        if isinstance(tuner, cls):  # they load now (a model offloaded next keeps weights on meta on purpose)
            tuner.meta_experts = False
        return remapped

    def _create_and_replace(
        self,
        config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, MoPELayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        ROUTERS[config.router].check_module(self.model, current_key, config)
        new_module = layer_class_for(target)(
            target,
            adapter_name,
            config,
            context=self.routing_context,
            mask_key=self._mask_key_for(current_key),
            module_name=current_key,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _mask_key_for(self, module_name: str) -> str:
        if not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            return "attention_mask"
        in_decoder = "decoder" in module_name.split(".")
        if in_decoder and not CROSS_ATTENTION_KV.search(module_name):
            return "decoder_attention_mask"
        return "attention_mask"

    # routing context and aux losses -------------------------------------------------------------

    def warn_unread_task_ids(self) -> None:
        """Warn (once) that a forward's task ids reach no router: no active adapter routes by task."""
        levels = {getattr(self.peft_config.get(name), "routing_level", None) for name in self.active_adapters}
        if "task" in levels:
            return
        self.warned_unread_task_ids = True
        warnings.warn(
            f"mope_task_ids were given, but no active MoPE adapter routes by task (routing_level {sorted(levels)}), "
            "so they are ignored; set routing_level='task' (with num_tasks) to route by them.",
            stacklevel=3,
        )

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Start a call with CAPTURED_INPUTS for the routers; remove mope's own (``consumed``) ones from the call."""
        if self.meta_experts:  # on CPU torch computes with a meta weight, without an error (NaN, or 0.16 off)
            error = meta_weights_error(self.model)
            if error is not None:
                raise error
            self.meta_experts = False  # loaded: no more checks
        inputs = dict(self.routing_context.given)
        consumed = {spec.name for spec in CAPTURED_INPUTS if spec.consumed and spec.name in kwargs}
        for spec in CAPTURED_INPUTS:
            name = spec.name
            value = kwargs.get(name)
            if value is None and args and not spec.consumed:
                if self.forward_parameter_names is None:
                    self.forward_parameter_names = list(inspect.signature(module.forward).parameters)
                if name in self.forward_parameter_names:
                    index = self.forward_parameter_names.index(name)
                    value = args[index] if index < len(args) else None
            spec.check(value)
            if isinstance(value, torch.Tensor):
                inputs[spec.routing_key] = value
        # the table PEFT shares with a tuner stacked on the same model (a LoRA) holds its configs too
        sequence_level = any(getattr(c, "routing_level", None) == "sequence" for c in self.peft_config.values())
        if sequence_level and kwargs.get("attention_mask") is None and not self.routing_context.decisions.pinned:
            # no mask at all (a dict of masks, Qwen2's under a static cache, is one), outside generate
            refuse_packed_rows(kwargs.get("position_ids"))
        complete_inputs(module, kwargs, inputs)
        if "task_ids" in inputs and not self.warned_unread_task_ids:
            self.warn_unread_task_ids()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x renamed past_key_values
        # compiled: a layer seeing fewer tokens than the mask is taken for a decoding step, as before (the cache's
        # length would be one more guard, and a recompilation, per decoded token)
        continues = torch.compiler.is_compiling() or holds_tokens(cache)
        collecting = module.training and not self.routing_context.decisions.pinned  # inside generate: no losses
        call = self.routing_context.begin(inputs, collecting=collecting, continues_cache=continues)
        frames = getattr(module, "_get_feature_vector_attention_mask", None)  # Wav2Vec2, HuBERT, WavLM, ...
        if frames is not None and isinstance(inputs.get("attention_mask"), torch.Tensor):
            call.frame_mask = frames
        kept = kwargs.get("logits_to_keep")
        call.kept_logits = kept if isinstance(kept, int) and not isinstance(kept, bool) else 0
        call.schedule_counts = [(schedule, schedule.count) for schedule in schedules_of(self).values()]
        if module.training and torch.is_grad_enabled():
            if self.checkpointed_layers is None:  # the modules transformers checkpoints (set up once)
                self.checkpointed_layers = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]
            keep_calls_in_recomputation(self.checkpointed_layers, self.routing_context)
        # a causal LM's loss normalised over an accumulated batch (Trainer): the aux joins it by tokens
        self.routing_context.call.aux_share = (
            accumulation_share(kwargs) if module.training and self.causal_lm() else None
        )
        if consumed:
            return args, {key: value for key, value in kwargs.items() if key not in consumed}
        return None

    def _attach_aux_loss(self, module: nn.Module, args: tuple, output: Any) -> Any:
        share, continues_cache = self.routing_context.call.aux_share, self.routing_context.call.continues_cache
        records = self.routing_context.finish()
        if output is None:  # the forward raised: its call is closed, its records (and their graph) dropped
            return None
        training = module.training and torch.is_grad_enabled()  # not a no-grad metrics forward (TRL's, in train mode)
        attached = None
        if records:
            aux = self.combine_losses(records)
            if training and not aux.requires_grad:
                check_losses_reach_routers(module, {record.adapter_name for record in records}, continues_cache)
            attached = attach_aux_loss(output, aux, module, share)
        if training and self.adapters_enabled:  # a forward that went through (a refused one counts no step) and routed
            advance_schedules(self, "forward")
        return attached

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT upcasts an adapter's half-precision parameters to float32; so too a router's buffers (Arrow's
        prototypes, which a half-precision base rounded: 32 of 7168 tokens went to other experts)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for layer in self._mope_layers():
            if adapter_name in layer.mope_router:
                router = layer.mope_router[adapter_name]
                for name, buffer in router.named_buffers(recurse=False):
                    if buffer.dtype in (torch.float16, torch.bfloat16):
                        setattr(router, name, buffer.float())

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled=enabled)
        self.adapters_enabled = enabled

    def causal_lm(self) -> bool:
        """Whether the model is a decoder-only LM (transformers' losses there read ``num_items_in_batch``): its
        adapters' task type says so, or, without one (a plain PeftModel, which Trainer gives it too), its class."""
        tasks = {str(getattr(c.task_type, "value", c.task_type)) for c in self.peft_config.values()}
        if "CAUSAL_LM" in tasks:
            return True
        return loss_reads_items(type(self.model))

    def combine_losses(self, records) -> torch.Tensor:
        """``sum over (adapter, loss) of coef * mean over modules``; see :mod:`mope.losses`."""
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for record in records:
            groups[(record.adapter_name, record.loss_name)].append(record)
        total = None
        # each layer tensor the losses read is stacked once (mope.routing.base.stack_tokens); not in a compiled
        # graph, which would guard on the dict's keys (ids of this forward's tensors) and recompile each step
        stacked: dict | None = None if torch.compiler.is_compiling() else {}
        for (adapter_name, loss_name), group in groups.items():
            loss = AUX_LOSS_BY_NAME[loss_name]
            term = getattr(self.peft_config[adapter_name], loss.coef_field) * loss.values(group, stacked).mean()
            total = term if total is None else total + term.to(total.device)
        return total

    def delete_adapter(self, adapter_name: str) -> None:
        routers = [
            layer.mope_router[adapter_name] for layer in self._mope_layers() if adapter_name in layer.mope_router
        ]
        super().delete_adapter(adapter_name)
        detach_schedule(self, adapter_name)
        self.routing_context.decisions.forget(routers)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Call the model, not model.forward as PEFT < 0.21 does, so that the two hooks above run.
        with naming_meta_weights(self.model):
            return self.model(*args, **kwargs)

    def _prepare_encoder_decoder_kwargs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        # PEFT < 0.21's PeftModelForSeq2SeqLM reads this attribute when it is built and in generate, but
        # transformers >= 5.18 no longer has it. generate() below does not use it.
        return self.model._prepare_encoder_decoder_kwargs_for_generation(*args, **kwargs)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PeftModel's forward and generate ask here first: ``adapter_names`` (one adapter per example, LoRA's
        mixed batches) is refused rather than ignored, which would run every example through the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "adapter_names= (an adapter per example) is not supported by MoPE adapters: every example would run "
                "through the active adapter. Run each adapter's examples apart, after set_adapter(name)."
            )
        yield

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``mope_task_ids``/``group_ids`` reach every step, sequence decisions stay the prompt's."""
        with naming_meta_weights(self.model):
            return generate_with_routing(self.model, self.routing_context, *args, **kwargs)

    # merging and unloading ----------------------------------------------------------------------

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """LoRA's combination of adapters into a new one; without this, PeftModel fell through to the base model's
        AttributeError."""
        raise NotImplementedError(
            "add_weighted_adapter (PEFT's weighted combination of LoRA adapters) does not apply to MoPE adapters, "
            "whose experts a router mixes per input. mope.export_lora(model, folder) writes one LoRA standing for a "
            "mixture; LoRAs exported so can be combined with add_weighted_adapter on a LoRA PeftModel."
        )

    def _mope_layers(self) -> list[MoPELayer]:
        return [m for m in self.model.modules() if isinstance(m, MoPELayer)]

    def _check_mope_merge(self, adapter_names: list[str] | None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        blockers = [
            blocker
            for layer in self._mope_layers()
            for name in names
            if name in layer.mope_experts and (blocker := layer.fold_blocker(name)) is not None
        ]
        if blockers:
            more = f" (and {len(blockers) - 1} more modules)" if len(blockers) > 1 else ""
            raise ValueError(
                f"Cannot merge the MoPE adapter into the base weights: {blockers[0]}{more}. Merging is exact "
                "only when the routing does not depend on the input (e.g. num_experts=1, or task-level routing with "
                "a task fixed by mope.fix_task); nothing was changed."
            )
        problem = next(filter(None, (layer.fold_order_problem(adapter_names) for layer in self._mope_layers())), None)
        if problem is not None:
            raise ValueError(f"Cannot merge: {problem}; nothing was changed.")
        if safe_merge:  # every layer before any: PEFT merges (and unloads) layer by layer, and stopped half-way
            problem = next(filter(None, (layer.unsafe_merge(adapter_names) for layer in self._mope_layers())), None)
            if problem is not None:
                raise ValueError(f"Cannot merge: {problem}; nothing was changed.")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mope_merge(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_mope_merge(adapter_names, safe_merge)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []
        release_recomputation(self.checkpointed_layers or [], self.routing_context)
        self.checkpointed_layers = None
        return model

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if new_module is getattr(child, "base_layer", None) or not isinstance(new_module, MoPELayer):
            # unload: the base layer, or the trained copy of a head PEFT saved whole, goes back as it is (PEFT's
            # version copies a Linear's weight and bias onto it, which a whole-FFN layer's MLP block and a nested
            # head such as RoBERTa's classifier do not have: unload stopped half-way)
            setattr(parent, child_name, new_module)
            return
        # injection, as PEFT's LoRA does it: the experts follow the base's device unless they are still on meta
        # (low_cpu_mem_usage); PEFT's version moved the whole layer for an 8-bit base ("Cannot copy out of meta")
        setattr(parent, child_name, new_module)
        weight = getattr(child, "weight", None)
        device = (weight if isinstance(weight, torch.Tensor) else next(child.parameters())).device
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.is_meta for p in module.parameters()):
                module.to(device)
