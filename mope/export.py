"""Collapse a trained mixture into one LoRA (sparse to dense) and export it as a plain PEFT LoRA bundle.

A mixture of LoRA experts adds, per token, ``s * sum_e g_e(x) B_e^T A_e x``. One LoRA cannot follow
an input-dependent gate, so the collapse replaces ``g_e(x)`` by a constant *usage* ``u_e`` per
module, and keeps the **usage-weighted average of the experts' updates**

    dW = s * sum_e u_e B_e^T A_e                     (nn.Linear layout [d_out, d_in])

which is a LoRA of rank N·r as it stands: stack the A's, scale each B by ``s u_e`` (alpha = r,
so PEFT's scaling is 1). Averaging the factors instead (``sum u A`` times ``sum u B``) would
add cross terms between experts; the stacked form is exact.

Usage rule, per module (shared experts always weigh 1, as in :meth:`MoPELayer.gate_weights`):

- ``usage`` given (keyed by module name, or by the PeftModel names :func:`mope.routing_stats` reports):
  the module's entry (a ``[N_routed]`` or ``[N]`` vector, a list, or a
  :func:`mope.routing_stats` report entry, whose ``load`` is read) is normalised to sum 1 over the
  routed experts: a renormalised top-k gate gives each token routed weights that sum to 1, so
  ``u`` is the share of that unit each expert got. A router that always picks one expert has
  one-hot load, and the collapse is that expert exactly. (For gates whose weights do not sum to 1,
  e.g. ``top_k_order='softmax_then_topk_unnormalised'``, this over-weights every expert alike.)
- ``usage=None``: the router's own weights where they do not depend on the input (num_experts=1,
  task-level routing pinned by :func:`mope.fix_task`, unless the gate routes a token by its batch:
  capacity that may drop it, expert choice, Soft MoE): exact; otherwise uniform, 1/N_routed each.

``router='soft_merge'`` with LoRA experts and ``soft_merge_lora='factors'`` applies the merged factors,
``s (sum_e g_e B_e)^T (sum_e g_e A_e)``, not the mixture: its collapse (like ``merge_and_unload``) is that
rank-r LoRA with ``g`` replaced by ``u`` (:meth:`mope.routing.Router.merged_lora`). Exact for a pinned task;
with usage statistics or the uniform fallback, the merged expert at the mean gate, which is not the mean of
the per-sequence merged experts (only a one-hot usage is exact).

Methods (``COLLAPSE_METHODS``): ``"concat"`` keeps the stacked factors (exact, rank N·r per module;
``rank`` must stay None); ``"svd"`` truncates dW to ``rank`` by SVD: the best rank-``rank``
approximation in Frobenius and spectral norm (Eckart-Young); ``rank=None`` keeps full rank. A
``rank`` above what dW can have (per module the sum of the experts' ranks, or min(in, out) where
smaller) is capped there with a :class:`RankCappedWarning`: padding to it would only write zeros.
Modules whose factors have fewer ranks are padded with zero rows, so one ``r`` fits all.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from safetensors.torch import save_file

from .bundles import save_pretrained as save_atomically
from .experts import EXPERT_BANKS
from .layer import MoPELayer

PEFT_PREFIX = "base_model.model."  # a module's name in the PeftModel = this + its name in the base model
UsageEntry = torch.Tensor | Sequence[float] | Mapping[str, Any]

# --- methods: (A, B, rank) -> (A', B') -------------------------------------------------------------


def concat(a: torch.Tensor, b: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked factors as they are: exact."""
    if rank is not None:
        raise ValueError(f"collapse_to_lora: rank={rank} applies to method='svd' only; 'concat' keeps rank N·r.")
    return a, b


def svd(a: torch.Tensor, b: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``B @ A`` without forming it: QR of both factors, SVD of the small core.

    ``B = Q_b R_b``, ``A^T = Q_a R_a`` give ``B A = Q_b (R_b R_a^T) Q_a^T``; the core's SVD ``U S V^T``
    is then the SVD of ``B A``. Singular values are split evenly (``sqrt(S)`` on each side).
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = s.shape[0] if rank is None else min(rank, s.shape[0])
    root = s[:keep].sqrt()
    return root[:, None] * (vh[:keep] @ q_a.T), (q_b @ u[:, :keep]) * root


COLLAPSE_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]] = {
    "concat": concat,
    "svd": svd,
}


class RankCappedWarning(UserWarning):
    """``rank`` asked for more than the mixture's update can have; the LoRA gets the largest rank it can use."""


def rank_cap_message(option: str, rank: int, cap: int) -> str:
    """Why ``option`` (``rank``, or the CLI's ``--rank``) was capped at ``cap``: said by the warning and ``mope collapse``."""
    return (
        f"{option}={rank} is more than the mixture's combined update can have: at most {cap} "
        "(per module the sum of the experts' ranks, or min(in_features, out_features) where smaller); "
        f"the LoRA gets r={cap}, which is exact (higher ranks would only add zeros)."
    )


@dataclass
class CollapsedModule:
    name: str
    lora_A: torch.Tensor  # [R, d_in]
    lora_B: torch.Tensor  # [d_out, R]
    transposed: bool  # GPT-2 Conv1D: PEFT needs fan_in_fan_out=True to merge it


# --- usage ---------------------------------------------------------------------------------------------


def usage_vector(module: str, entry: UsageEntry, num_routed: int, num_experts: int) -> torch.Tensor:
    """One module's usage over its routed experts, normalised to sum 1 (see the module docstring)."""
    if isinstance(entry, Mapping):  # a routing_stats entry: the gate's weight share (an older report: its load)
        if "weight" not in entry and "load" not in entry:
            raise ValueError(
                f"collapse_to_lora: usage['{module}'] is a mapping without 'weight' or 'load' (a routing_stats entry)."
            )
        entry = entry.get("weight", entry.get("load"))
    try:
        values = torch.as_tensor(entry, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"collapse_to_lora: usage['{module}'] is not a list of numbers ({error}).") from None
    if values.dim() != 1 or values.shape[0] not in (num_routed, num_experts):
        raise ValueError(
            f"collapse_to_lora: usage['{module}'] has shape {tuple(values.shape)}; this module has "
            f"{num_routed} routed experts ({num_experts} with shared ones): give [{num_routed}] or [{num_experts}]."
        )
    values = values[:num_routed]  # shared experts come last and always weigh 1
    if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(
            f"collapse_to_lora: usage['{module}'] must be finite, >= 0 and not all 0, got {values.tolist()}."
        )
    return values / values.sum()


def gate_for(layer: MoPELayer, adapter_name: str, usage: Mapping[str, UsageEntry] | None) -> torch.Tensor:
    """Usage over all N experts of ``layer`` (routed, then shared at weight 1), float64 on the bank's device."""
    router = layer.router_for(adapter_name)
    link = layer.mope_block.get(adapter_name)
    owner = layer.module_name if link is None else link.leader.module_name  # routing_stats keys the router's module
    num_experts = layer.mope_settings[adapter_name].num_experts
    if usage is not None:
        if owner not in usage:
            raise ValueError(f"collapse_to_lora: usage has no entry for module '{owner}' (its router's module).")
        routed = usage_vector(owner, usage[owner], router.num_experts, num_experts)
    else:
        fixed = router.fixed_weights()
        routed = torch.full((router.num_experts,), 1.0 / router.num_experts) if fixed is None else fixed
    device = layer.mope_experts[adapter_name].lora_B.device
    return layer.gate_weights(adapter_name, routed.to(device, torch.float64))


# --- collapse and export -------------------------------------------------------------------------------


def check_options(model: PeftModel, method: str, rank: int | None, adapter_name: str) -> Any:
    config = model.peft_config.get(adapter_name) if isinstance(model, PeftModel) else None
    if config is None or config.peft_type != "MOPE":
        raise ValueError(f"collapse_to_lora: adapter_name='{adapter_name}' is not a MoPE adapter of this PeftModel.")
    if method not in COLLAPSE_METHODS:
        raise ValueError(f"collapse_to_lora: method={method!r}; choose one of {sorted(COLLAPSE_METHODS)}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"collapse_to_lora: rank must be a positive int or None, got {rank!r}.")
    bank_class = EXPERT_BANKS[config.expert_type]
    if not bank_class.exports_lora:
        supported = sorted(name for name, cls in EXPERT_BANKS.items() if cls.exports_lora)
        raise ValueError(
            f"collapse_to_lora: expert_type={config.expert_type!r} gives {bank_class.no_lora_form}; "
            f"only {supported} collapse."
        )
    return config


def collapse_modules(
    model: PeftModel, method: str, rank: int | None, usage: Mapping[str, UsageEntry] | None, adapter_name: str
) -> list[CollapsedModule]:
    layers = [m for m in model.modules() if isinstance(m, MoPELayer) and adapter_name in m.mope_experts]
    refused = [m for m in layers if not m.mope_experts[adapter_name].exports_lora]
    if refused:  # e.g. whole-FFN experts on an MLP block, whatever expert_type says
        layer = refused[0]
        raise ValueError(
            f"collapse_to_lora: module '{layer.module_name}' has {layer.mope_experts[adapter_name].no_lora_form}."
        )
    if usage is not None:  # routing_stats keys are PeftModel names; module names lack the prefix
        usage = {key.removeprefix(PEFT_PREFIX): value for key, value in usage.items()}
        routers = {(link.leader if (link := m.mope_block.get(adapter_name)) else m).module_name for m in layers}
        unknown = sorted(set(usage) - routers)
        if unknown:
            raise ValueError(
                f"collapse_to_lora: usage names modules without a router of '{adapter_name}': {unknown[:5]}."
            )
    collapsed = []
    with torch.no_grad():
        for layer in layers:
            bank = layer.mope_experts[adapter_name]
            gate = gate_for(layer, adapter_name, usage)
            merged = layer.router_for(adapter_name).merged_lora(bank, gate)  # the forward's merge, if not the mixture
            a, b = bank.lora_factors(gate) if merged is None else merged
            a, b = COLLAPSE_METHODS[method](a, b, rank)
            collapsed.append(
                CollapsedModule(layer.module_name, a.to(bank.dtype), b.to(bank.dtype), layer.weight_transposed)
            )
    return collapsed


def auxiliary_state(model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The saved tensors of ``modules_to_save`` (e.g. a classifier head), under the keys PEFT saves them."""
    saved = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "modules_to_save", {}):
            if not isinstance(module, ModulesToSaveWrapper):
                raise ValueError(
                    f"collapse_to_lora: module '{name}' is a {type(module).__name__}; LoRA export "
                    "carries modules_to_save only."
                )
            for key in module.adapter_state_dict_load_map(adapter_name):
                state[f"{name}.{key}"] = saved[f"{name}.{key}"].detach().clone().contiguous()
    return state


def collapse_to_lora(
    model: PeftModel,
    *,
    method: str = "svd",
    rank: int | None = None,
    usage: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """One LoRA per adapted module standing for the mixture (see the module docstring for the rule).

    Returns a ``LoraConfig`` (target_modules = the adapted modules, alpha = r so scaling is 1,
    fan_in_fan_out for Conv1D, task type, base model and modules_to_save copied) and the state
    dict under PEFT's saved keys (``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``).
    """
    config = check_options(model, method, rank, adapter_name)
    modules = collapse_modules(model, method, rank, usage, adapter_name)
    if not modules:
        raise ValueError(f"collapse_to_lora: adapter '{adapter_name}' adapts no module.")
    r = max(m.lora_A.shape[0] for m in modules)  # svd keeps min(rank, what each module's update can have)
    if rank is not None and rank > r:
        warnings.warn(RankCappedWarning(f"collapse_to_lora: {rank_cap_message('rank', rank, r)}"), stacklevel=2)
    state = {}
    for m in modules:
        pad = r - m.lora_A.shape[0]  # zero ranks add nothing: one r for all modules
        a = torch.nn.functional.pad(m.lora_A, (0, 0, 0, pad))
        b = torch.nn.functional.pad(m.lora_B, (0, pad))
        state[f"{PEFT_PREFIX}{m.name}.lora_A.weight"] = a.contiguous()
        state[f"{PEFT_PREFIX}{m.name}.lora_B.weight"] = b.contiguous()
    state.update(auxiliary_state(model, adapter_name))
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        target_modules=sorted(m.name for m in modules),
        fan_in_fan_out=any(m.transposed for m in modules),
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return lora_config, state


@dataclass
class LoraBundle:
    """What :func:`mope.bundles.save_pretrained` writes atomically: a PEFT LoRA config and its tensors."""

    config: LoraConfig
    state: dict[str, torch.Tensor]

    def save_pretrained(self, folder: str) -> None:
        self.config.save_pretrained(folder)
        save_file(self.state, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def export_lora(model: PeftModel, out_dir: str | os.PathLike, **options: Any) -> Path:
    """Collapse (``collapse_to_lora(model, **options)``) and write a PEFT LoRA bundle to ``out_dir``.

    The bundle loads with ``PeftModel.from_pretrained`` in a process that never imports mope. It is
    computed in full before anything is written, then moved into place atomically: a failed export
    leaves an older bundle in ``out_dir`` intact.
    """
    config, state = collapse_to_lora(model, **options)
    save_atomically(LoraBundle(config, state), out_dir)
    return Path(out_dir)
