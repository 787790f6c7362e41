"""``MoPELayer``: a frozen base module plus, per adapter, an expert bank and a router."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .context import RoutingContext
from .experts import EXPERT_BANKS
from .losses import AUX_LOSSES
from .routing import ROUTERS

# Module types that can carry experts, and whether their weight is stored transposed
# ([in, out], GPT-2's Conv1D) relative to nn.Linear ([out, in]).
SUPPORTED_BASE_LAYERS: dict[type[nn.Module], bool] = {nn.Linear: False, Conv1D: True}


def supported_base_layer(module: nn.Module) -> bool:
    return isinstance(module, tuple(SUPPORTED_BASE_LAYERS))


class MoPELayer(nn.Module, BaseTunerLayer):
    """Wraps an ``nn.Linear`` or ``Conv1D``: ``y = base(x) + sum_adapters mixture(x)``."""

    adapter_layer_names = ("mope_experts", "mope_router")
    other_param_names = ("mope_aux_losses",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config,
        context: RoutingContext | None = None,
        mask_key: str = "attention_mask",
        module_name: str = "",
    ) -> None:
        super().__init__()
        if not supported_base_layer(base_layer):
            raise ValueError(
                f"Module '{module_name}' is a {type(base_layer).__name__}; MoPE experts attach to "
                f"{', '.join(t.__name__ for t in SUPPORTED_BASE_LAYERS)} only. Adjust target_modules."
            )
        self.base_layer = base_layer
        self.mope_experts = nn.ModuleDict()
        self.mope_router = nn.ModuleDict()
        self.mope_aux_losses: dict[str, tuple[str, ...]] = {}
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self.weight_transposed = next(t for cls, t in SUPPORTED_BASE_LAYERS.items() if isinstance(base_layer, cls))
        self.routing_context = context
        self.mask_key = mask_key
        self.module_name = module_name
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        self.mope_experts[adapter_name] = EXPERT_BANKS[config.expert_type](self.in_features, self.out_features, config)
        self.mope_router[adapter_name] = ROUTERS[config.router](self.in_features, config)
        self.mope_aux_losses[adapter_name] = tuple(
            loss.name for loss in AUX_LOSSES if getattr(config, loss.coef_field) > 0
        )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        ctx = self.routing_context
        for name in self.active_adapters:
            if name not in self.mope_experts:
                continue
            bank = self.mope_experts[name]
            routing = self.mope_router[name](x)
            delta = bank(x.to(bank.lora_A.dtype), routing.weights)
            result = result + delta.to(result.dtype)
            if ctx is not None and ctx.collecting and self.training and self.mope_aux_losses[name]:
                self._record_losses(ctx, name, routing, x.shape[:-1])
        return result

    def _record_losses(self, ctx: RoutingContext, adapter_name: str, routing, token_shape) -> None:
        mask = ctx.token_mask(self.mask_key, token_shape)
        wanted = self.mope_aux_losses[adapter_name]
        for loss in AUX_LOSSES:
            if loss.name in wanted:
                ctx.record(adapter_name, loss.name, loss.fn(routing, mask))

    # merging ---------------------------------------------------------------------------------

    def merge_blocker(self, adapter_name: str) -> str | None:
        """Why ``adapter_name`` cannot be merged into the base weight here, or None if it can."""
        router = self.mope_router[adapter_name]
        if router.fixed_weights() is None:
            return (
                f"module '{self.module_name}': adapter '{adapter_name}' routes by input "
                f"({type(router).__name__} over {router.num_experts} experts), so no single weight update "
                "reproduces it"
            )
        return None

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Weight update in the base layer's own layout; only for input-independent routing."""
        blocker = self.merge_blocker(adapter_name)
        if blocker is not None:
            raise ValueError(f"Cannot merge: {blocker}.")
        delta = self.mope_experts[adapter_name].delta_weight(self.mope_router[adapter_name].fixed_weights())
        return delta.T if self.weight_transposed else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [name for name in adapter_names if name in self.mope_experts]
        for name in names:  # check all before changing anything
            self.get_delta_weight(name)
        weight = self.get_base_layer().weight
        for name in names:
            delta = self.get_delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(f"Merging adapter '{name}' into '{self.module_name}' gives non-finite weights.")
            weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mope_experts:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def __repr__(self) -> str:
        return "mope." + super().__repr__()
