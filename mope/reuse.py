"""Reuse LoRA adapters that PEFT trained and saved: each becomes one expert of a new mixture.

``from_lora_adapters(base, [path_0, ..., path_{N-1}], config)`` reads N folders written by PEFT's
``save_pretrained`` and returns a MoPE model whose expert e on every module *is* adapter e:
with all gate weight on e, the output equals ``PeftModel.from_pretrained(base, path_e)``'s.

How the N adapters fit one ``LoRAExpertBank``: the bank has one rank r and one scaling
``lora_alpha / r``. The bank's r is the largest adapter rank and ``lora_alpha = r`` (scaling 1);
a smaller adapter is padded with zero rows of A and B (exact: zeros add nothing), and each
adapter's own scaling (``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with rsLoRA, after its
``rank_pattern`` / ``alpha_pattern``) is folded into its B. Only the tensor files are read,
with safetensors (nothing is unpickled); every check runs before the model is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import _get_in_out_features, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import MoPEConfig
from .layer import MoPELayer, supported_base_layer
from .routing.arrow import init_arrow

# PEFT writes "base_model.model.<module>.lora_A.weight" (the adapter name removed); accept it with one.
EMBEDDING_LORA_KEY = re.compile(r"\.lora_embedding_[AB](?:\.[^.]+)?$")  # PEFT's LoRA of an nn.Embedding
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

# LoRA options whose adapters the saved A and B alone do not reproduce, and why.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA adds a magnitude vector and a normalisation a LoRA expert does not have",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA pools the input before A",
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens",
    "layer_replication": "layer replication changes the base model",
    "target_parameters": "it adapts parameters, not modules",
    "trainable_token_indices": "it trains token embeddings",
    "modules_to_save": "it trains full copies of modules (e.g. a classification head), one per adapter",
    "megatron_config": "Megatron parallel layers",
    "use_bdlora": "BD-LoRA keeps block-diagonal factors, not the dense A and B of a LoRA expert",
    "kasa_config": "KaSA truncates the base weight and scales its update by a learned diagonal",
    "velora_config": "VeLoRA is a LoRA variant whose saved state goes beyond A and B",
    "monteclora_config": "Monte Carlo LoRA samples its update from variational parameters beyond A and B",
    "arrow_config": "PEFT's Arrow routes among its LoRAs itself; give their folders here instead",
}
# init_lora_weights values that change the base weights: the adapter only fits the changed base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraAdapter:
    """One saved LoRA: per module (base model names), its A ``[r, d_in]`` and its scaled B ``s * B [d_out, r]``."""

    path: str
    config: LoraConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # Other tensors PEFT saved beside the LoRA (e.g. an adapted lm_head's base weight): usable only
    # if they equal the base model's own (see check_extra_tensors).
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())


def refuse(path: str, problem: str) -> ValueError:
    return ValueError(f"LoRA adapter '{path}': {problem}")


def read_lora_config(path: str) -> LoraConfig:
    """The adapter's ``LoraConfig``, refused if it is no plain LoRA the expert bank can reproduce."""
    if not os.path.isdir(path):
        raise refuse(path, "no such folder")
    for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise refuse(path, f"missing {name} (a folder written by PEFT's save_pretrained; safetensors only)")
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise refuse(path, f"{CONFIG_NAME} is not JSON ({error})") from error
    if not isinstance(raw, dict):
        raise refuse(path, f"{CONFIG_NAME} holds a JSON {type(raw).__name__}, not an object of config keys")
    if raw.get("peft_type") != "LORA":
        raise refuse(path, f"{CONFIG_NAME} has peft_type={raw.get('peft_type')!r}, not 'LORA'")
    try:
        config = LoraConfig.from_pretrained(path)
    except (TypeError, ValueError) as error:
        raise refuse(path, f"{CONFIG_NAME} is not a valid LoraConfig ({error})") from error
    if config.bias != "none":
        raise refuse(path, f"bias={config.bias!r}: it trains base-model biases; only bias='none' can be reused")
    for option, reason in UNSUPPORTED_OPTIONS.items():
        if getattr(config, option, None):
            raise refuse(path, f"{option} is not supported ({reason})")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise refuse(path, f"init_lora_weights={init!r} changes the base weights; convert it to a plain LoRA first")
    return config


def read_lora_adapter(path: str) -> LoraAdapter:
    """Read and check one PEFT LoRA folder (config + safetensors, never a pickle)."""
    config = read_lora_config(path)
    file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    try:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if EMBEDDING_LORA_KEY.search(key):
                    module = EMBEDDING_LORA_KEY.sub("", key).removeprefix("base_model.model.")
                    raise refuse(
                        path, f"module '{module}' is an embedding ({key}): only Linear / Conv1D LoRAs are experts"
                    )
                match = LORA_KEY.match(key)
                if match is None:
                    extras[key] = handle.get_tensor(key)
                else:
                    parts.setdefault(match["module"], {})[match["part"]] = handle.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise refuse(path, f"cannot read {file}: truncated or not safetensors ({error})") from error
    if not parts:
        raise refuse(path, f"{file} holds no LoRA weights")
    factors = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise refuse(path, f"module '{module}' has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if not (a.is_floating_point() and b.is_floating_point()) or not (a.isfinite().all() and b.isfinite().all()):
            raise refuse(path, f"module '{module}': lora_A or lora_B holds NaN, inf or non-float values")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        if a.dim() != 2 or b.dim() != 2:  # a Conv2d's LoRA (4-D factors)
            raise refuse(path, f"module '{module}': lora_A is {a.dim()}-D, not a Linear / Conv1D LoRA's 2-D")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise refuse(
                path, f"module '{module}': lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have rank {rank}"
            )
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        factors[module] = (a, b.double() * scaling)
    return LoraAdapter(path, config, factors, extras)


def check_extra_tensors(adapter: LoraAdapter, base_model: nn.Module) -> None:
    """Tensors besides A and B must be copies of the base model's (PEFT saves an adapted lm_head's base weight).

    A trained copy (modules_to_save, resized or trained embeddings) belongs to one adapter and
    cannot be shared by all experts, so it is refused.
    """
    params = dict(base_model.state_dict())
    for key, tensor in adapter.extras.items():
        name = re.sub(r"^base_model\.model\.", "", key).replace(".base_layer.", ".")
        if name in params and params[name].shape != tensor.shape:
            raise refuse(
                adapter.path,
                f"tensor '{key}' has shape {list(tensor.shape)}, the base model's '{name}' {list(params[name].shape)} "
                "(made for another base model or hidden size?)",
            )
        if name not in params or not torch.equal(params[name], tensor.to(params[name].dtype)):
            raise refuse(
                adapter.path,
                f"tensor '{key}' is not a LoRA A/B weight and differs from the base model's "
                "(trained modules_to_save, embeddings or DoRA magnitudes cannot be shared by all experts)",
            )


def resolve_module_names(adapter: LoraAdapter, base_model: nn.Module) -> None:
    """Rename the adapter's modules to the base model's names; check type and shapes (in place)."""
    modules = dict(base_model.named_modules())
    renamed = {}
    for name, (a, b) in adapter.factors.items():
        found = name if name in modules else None
        if found is None:  # e.g. saved from another wrapper: accept one unambiguous suffix match
            candidates = [n for n in modules if n.endswith("." + name) or name.endswith("." + n)]
            found = candidates[0] if len(candidates) == 1 else None
        if found is None:
            raise refuse(adapter.path, f"module '{name}' is not in the base model (made for another base model?)")
        module = modules[found]
        if not supported_base_layer(module):
            raise refuse(adapter.path, f"module '{found}' is a {type(module).__name__}; only Linear/Conv1D are reused")
        d_in, d_out = _get_in_out_features(module)
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise refuse(
                adapter.path,
                f"module '{found}': lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit its "
                f"{d_in} -> {d_out} features (made for another base model or hidden size?)",
            )
        renamed[found] = (a, b)
    adapter.factors = renamed


def check_same_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    """All adapters must adapt the same modules of the same base model; returns those modules."""
    first = adapters[0]
    for adapter in adapters[1:]:
        base_names = (first.config.base_model_name_or_path, adapter.config.base_model_name_or_path)
        if all(base_names) and base_names[0] != base_names[1]:
            raise refuse(
                adapter.path, f"made for base model '{base_names[1]}', but '{first.path}' for '{base_names[0]}'"
            )
        for one, other in ((adapter, first), (first, adapter)):
            extra = sorted(set(one.factors) - set(other.factors))
            if extra:
                raise refuse(one.path, f"adapts module '{extra[0]}', which '{other.path}' does not adapt")
    return sorted(first.factors)


def check_user_targets(config: MoPEConfig, modules: list[str], base_model: nn.Module) -> None:
    """A given ``target_modules`` (and ``exclude_modules``) must pick exactly the modules the adapters adapt."""
    wanted = copy.deepcopy(config)
    if wanted.target_modules is None:  # the adapters' modules, less the excluded ones
        wanted.target_modules = set(modules)
    _maybe_include_all_linear_layers(wanted, base_model)
    picked = {
        name
        for name, m in base_model.named_modules()
        if supported_base_layer(m) and check_target_module_exists(wanted, name)
    }
    for names, problem in (
        (sorted(set(modules) - picked), "leaves out module '{}', which the adapters adapt"),
        (sorted(picked - set(modules)), "picks module '{}', which the adapters do not adapt"),
    ):
        if names:
            given = "target_modules" if config.target_modules is not None else "exclude_modules"
            raise ValueError(
                f"MoPEConfig.{given}={getattr(config, given)!r} {problem.format(names[0])} "
                f"({len(names)} such); leave it None to take the adapters' modules"
            )


def mixture_config(
    config: MoPEConfig | None, adapters: Sequence[LoraAdapter], modules: list[str], trainable: bool
) -> MoPEConfig:
    """The user's config (or Arrow top-2 by default) with num_experts, r, lora_alpha and targets from the adapters."""
    n, rank = len(adapters), max(adapter.rank for adapter in adapters)
    if config is None:
        config = MoPEConfig(
            task_type=adapters[0].config.task_type,
            router="arrow",
            num_experts=n,
            top_k=min(2, n),
            aux_loss_coef=0.0,
            z_loss_coef=0.0,
        )
    if not isinstance(config, MoPEConfig):
        raise ValueError(f"from_lora_adapters: config must be a MoPEConfig, got {type(config).__name__}")
    default_n = next(f.default for f in dataclasses.fields(MoPEConfig) if f.name == "num_experts")
    if config.num_experts not in (n, default_n):
        raise ValueError(f"MoPEConfig.num_experts={config.num_experts}, but {n} adapter paths were given")
    if config.expert_type != "lora":
        raise ValueError(f"MoPEConfig.expert_type={config.expert_type!r}: reused LoRA adapters need 'lora'")
    if config.num_experts_pattern:
        raise ValueError("MoPEConfig.num_experts_pattern must be empty: every module has one expert per adapter")
    return dataclasses.replace(
        config,
        num_experts=n,
        r=rank,
        lora_alpha=rank,  # bank scaling 1: each adapter's own scaling is folded into its B
        target_modules=modules,
        freeze_experts=not trainable,
        init_weights=False,  # the adapters' weights replace the start (frozen identity experts are refused)
    )


@torch.no_grad()
def copy_experts(model: PeftModel, adapters: Sequence[LoraAdapter], adapter_name: str) -> None:
    """Write adapter e into expert e of every bank: A padded, B scaled by s_e / s_bank, transposed, padded."""
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, MoPELayer) or adapter_name not in layer.mope_experts:
            continue
        bank = layer.mope_experts[adapter_name]
        bank.lora_A.zero_()
        bank.lora_B.zero_()
        for e, adapter in enumerate(adapters):
            a, scaled_b = adapter.factors[name]
            rank = a.shape[0]
            bank.lora_A[e, :rank] = a.to(bank.lora_A.dtype)
            bank.lora_B[e, :rank] = (scaled_b / bank.scaling).T.to(bank.lora_B.dtype)


def from_lora_adapters(
    base_model: nn.Module,
    paths: Sequence[str | os.PathLike],
    config: MoPEConfig | None = None,
    *,
    trainable: bool = False,
    adapter_name: str = "default",
) -> PeftModel:
    """A MoPE model whose N experts are the N PEFT LoRA adapters in ``paths``, with a new router.

    ``config``: the mixture's gate and options (a ``MoPEConfig``); ``num_experts``, ``r``,
    ``lora_alpha`` and ``target_modules`` come from the adapters (a ``target_modules`` or
    ``num_experts`` given must agree with them). None: ``router='arrow'``, top-2, no aux losses,
    which routes well with no training at all. ``trainable=False`` freezes the experts for
    good (``MoPEConfig.freeze_experts``): only the router trains, also after a reload.
    Raises ``ValueError`` naming the adapter folder and module, before the model is changed.
    """
    if isinstance(base_model, PeftModel):
        raise ValueError("from_lora_adapters: base_model is already a PeftModel; pass the plain base model")
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise ValueError(
            f"from_lora_adapters: paths={paths!r} is one path; give a list of LoRA folders, one per expert"
        )
    paths = list(paths)  # a generator too: read once
    if not paths:
        raise ValueError("from_lora_adapters: paths is empty; give one LoRA folder per expert")
    strange = next((path for path in paths if not isinstance(path, (str, os.PathLike))), None)
    if strange is not None:
        raise ValueError(
            f"from_lora_adapters: paths holds a {type(strange).__name__}; give the LoRA folders (save_pretrained's "
            "output), one per expert"
        )
    if config is not None and (config.layers_to_transform is not None or config.layers_pattern):
        raise ValueError(
            "from_lora_adapters: MoPEConfig.layers_to_transform / layers_pattern cannot narrow the mixture: it adapts "
            "exactly the modules the LoRAs adapt; leave them None (or give LoRAs of those layers only)"
        )
    adapters = [read_lora_adapter(os.fspath(path)) for path in paths]
    for adapter in adapters:
        check_extra_tensors(adapter, base_model)
        resolve_module_names(adapter, base_model)
    modules = check_same_modules(adapters)
    if config is not None and (config.target_modules is not None or config.exclude_modules):
        check_user_targets(config, modules, base_model)
    config = mixture_config(config, adapters, modules, trainable)
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    copy_experts(model, adapters, adapter_name)
    if config.router == "arrow":
        init_arrow(model, adapter_name)
    return model


__all__ = ["LoraAdapter", "from_lora_adapters", "init_arrow", "read_lora_adapter"]
