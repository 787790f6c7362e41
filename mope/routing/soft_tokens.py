"""Soft MoE token merging (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Per module and sequence there are ``S = N * p`` slots (``p = MoPEConfig.slots_per_expert``);
slot s belongs to expert ``s // p``. With router weight ``Φ [S, d]`` and logits ``l = x Φ^T``:

    D = softmax over tokens (padding excluded) of l      dispatch, [batch, T, S]
    x̃_s = sum_t D_ts x_t                                 slot inputs
    ỹ_s = f_{e(s)}(x̃_s)                                  the slot's expert delta (LoRA / adapter)
    C = softmax over slots of l                           combine, [batch, T, S]
    y_t = base(x_t) + sum_s C_ts ỹ_s

Every slot mixes all tokens of its sequence, later ones included: encoder (non-causal) models
only. A causal task type is refused by the config, a decoder module at injection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import check_int
from ..experts import EXPERT_BANKS
from .base import Router, Routing, RoutingInputs
from .expert_choice import CAUSAL_TASK_TYPES


@dataclass
class SoftTokenRouting(Routing):
    """A Routing plus Soft MoE's ``dispatch`` and ``combine`` weights ``[..., S]`` (token dims first).

    ``weights``/``probs``/``load`` are each expert's share of a token's combine weights (its slots
    summed); ``logits`` the logsumexp of the expert's slot logits, so the router losses read them.
    """

    dispatch: torch.Tensor | None = None
    combine: torch.Tensor | None = None


class SoftTokensRouter(Router):
    """Soft MoE: slots are dispatch-weighted token averages; tokens read back combine-weighted slot outputs."""

    sparse_weights = False
    schedules_top_k = False
    applies_experts = True

    def __init__(self, in_features: int, num_experts: int, top_k: int, config: Any) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.slots_per_expert = config.slots_per_expert

    def weights_need_the_batch(self) -> bool:
        return True  # experts act on slots, averages of the sequence's tokens, even with one expert and one slot

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> int:
        return num_experts * config.slots_per_expert  # Φ: one row per slot, slot s belongs to expert s // p

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_int("MoPEConfig", "slots_per_expert", config.slots_per_expert, low=1)

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        """Encoder task types, token level, additive experts, no shared experts, one router per module."""
        c = config
        task_type = str(getattr(c.task_type, "value", c.task_type)) if c.task_type is not None else None
        if task_type in CAUSAL_TASK_TYPES:
            raise ValueError(
                f"MoPEConfig.router='soft_tokens' (Soft MoE) is for encoder (non-causal) models: each slot mixes every "
                f"token of the sequence, later ones included, so task_type={task_type!r} cannot use it. Choose "
                "router='soft_merge' or 'dense' for causal models."
            )
        if c.routing_level != "token":
            raise ValueError("MoPEConfig.routing_level must be 'token' with router='soft_tokens': slots mix the tokens")
        if not EXPERT_BANKS[c.expert_type].soft_tokens:
            supported = sorted(name for name, bank in EXPERT_BANKS.items() if bank.soft_tokens)
            raise ValueError(
                f"MoPEConfig.expert_type={c.expert_type!r} with router='soft_tokens': slots need additive experts "
                f"({', '.join(map(repr, supported))})"
            )
        if c.num_shared_experts:
            raise ValueError("MoPEConfig.num_shared_experts must be 0 with router='soft_tokens'")
        if c.router_blocks:
            raise ValueError(
                "MoPEConfig.router_blocks is not supported with router='soft_tokens' (slots are per module)"
            )

    def gate(self, logits: torch.Tensor, inputs: RoutingInputs) -> Routing:
        token_shape, slots = logits.shape[:-1], logits.shape[-1]
        flat = logits.reshape(token_shape[0], -1, slots)  # [batch, T, S]
        over_tokens = flat
        if inputs.token_mask is not None:
            real = inputs.token_mask.reshape(flat.shape[:2]).to(device=flat.device, dtype=torch.bool)
            over_tokens = flat.masked_fill(~real.unsqueeze(-1), torch.finfo(flat.dtype).min)
        dispatch = torch.softmax(over_tokens, dim=1).reshape(logits.shape)
        combine = torch.softmax(logits, dim=-1)
        per_expert = (self.num_experts, self.slots_per_expert)
        share = combine.unflatten(-1, per_expert).sum(-1)
        expert_logits = logits.unflatten(-1, per_expert).logsumexp(-1)
        return SoftTokenRouting(
            weights=share, probs=share, logits=expert_logits, load=share, dispatch=dispatch, combine=combine
        )

    def apply_experts(self, bank, x, base_out, routing, weights):
        if not bank.soft_tokens:
            raise ValueError(f"router='soft_tokens' cannot run {type(bank).__name__} experts")
        dtype = next(bank.parameters()).dtype
        batch = x.shape[0]
        dispatch = routing.dispatch.reshape(batch, -1, routing.dispatch.shape[-1]).to(dtype)  # [batch, T, S]
        combine = routing.combine.reshape(dispatch.shape).to(dtype)
        slots = (self.num_experts, self.slots_per_expert)
        xs = dispatch.transpose(1, 2) @ bank.dropout(x.to(dtype)).reshape(batch, -1, x.shape[-1])
        zs = dispatch.transpose(1, 2) @ base_out.to(dtype).reshape(batch, -1, base_out.shape[-1])
        outs = bank.slot_deltas(xs.unflatten(1, slots), zs.unflatten(1, slots)).flatten(1, 2)  # [batch, S, d_out]
        return base_out + (combine @ outs).reshape(base_out.shape).to(base_out.dtype)

    @classmethod
    def check_module(cls, model: nn.Module, module_name: str, config: Any) -> None:
        model_config = getattr(model, "config", None)
        if getattr(model_config, "is_encoder_decoder", False):
            causal = "decoder" in module_name.split(".")
        else:
            can_generate = getattr(model, "can_generate", None)
            causal = bool(getattr(model_config, "is_decoder", False)) or bool(callable(can_generate) and can_generate())
        if causal:
            raise ValueError(
                f"MoPEConfig.router='soft_tokens' cannot adapt '{module_name}': it sits in a causal decoder, and Soft "
                "MoE mixes every token of a sequence (later ones included) into each slot. Use it on encoder models, "
                "or choose router='soft_merge' or 'dense'."
            )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", slots_per_expert={self.slots_per_expert}"
