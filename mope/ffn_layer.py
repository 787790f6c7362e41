"""Whole-FFN experts (MixLoRA, Li et al. 2024): each expert is the gated MLP with its own LoRAs.

Target an MLP *block* instead of its projections (``target_modules=["mlp"]`` on Llama, Mistral,
Qwen2: a module with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``) and every expert is
a full FFN with a LoRA on each of its three projections and its own nonlinearity:

    h_e(x)   = act((W1 + s dW1_e) x) * (W3 + s dW3_e) x
    FFN_e(x) = (W2 + s dW2_e) h_e(x)
    y        = sum_e g_e FFN_e(x) + (1 - sum_e g_e) FFN(x)

The last term gives the frozen MLP whatever weight the gate does not hand out: 0 for a
renormalised top-k or a dense gate, the whole token for one that capacity dropped (as a frozen
layer would), and it keeps ``init_weights=True`` an exact start at the base model even with
shared experts (weight 1 each).

Cost: W2 is linear, so ``sum_e g_e W2 h_e = W2 (sum_e g_e h_e)``: the frozen down projection runs
once per token on the gate-weighted sum of the experts' hidden states, not k times; ``W1 x`` and
``W3 x`` run once too. Per (token, expert) pair only the rank-r deltas and the elementwise
nonlinearity run, on the expert's tokens grouped by ``mope.dispatch.sort_pairs`` (a loop over
experts, never over tokens). The k hidden states per token are what MixLoRA's extra memory is.

Per-projection experts (``target_modules=["gate_proj", "up_proj", "down_proj"]``, optionally
with ``router_blocks=["mlp"]``) are the cheaper alternative: one nonlinearity, mixtures inside
each linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base_layers import check_base_layer
from .experts.ffn import FFNExpertBank
from .layer import MoPELayer
from .routing import ROUTERS


@dataclass(frozen=True)
class GatedMLP:
    """Attribute names of a gated MLP block: ``down(act(gate(x)) * up(x))``."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    act: str = "act_fn"

    def projections(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    def matches(self, module: nn.Module) -> bool:
        """The block's layout by name; whether its projections can be wrapped is :func:`check_base_layer`'s call."""
        parts = (getattr(module, name, None) for name in self.projections())
        return all(isinstance(m, nn.Module) for m in parts) and callable(getattr(module, self.act, None))


# Block layouts that can carry whole-FFN experts; add one line for another family's MLP.
FFN_BLOCKS: tuple[GatedMLP, ...] = (GatedMLP(),)


def ffn_block_layout(module: nn.Module) -> GatedMLP | None:
    return next((layout for layout in FFN_BLOCKS if layout.matches(module)), None)


def projection_features(block: nn.Module, layout: GatedMLP, module_name: str) -> dict[str, tuple[int, int]]:
    """Each projection's (in, out) features; the projections run as they are (dense or quantized), so each
    must be a base layer type mope knows (:func:`mope.base_layers.check_base_layer` names it otherwise)."""
    parts = {name: getattr(block, name) for name in layout.projections()}
    return {name: check_base_layer(m, f"{module_name}.{name}").features(m) for name, m in parts.items()}


@torch.no_grad()
def check_block_computes_layout(block: nn.Module, layout: GatedMLP, module_name: str, in_features: int) -> None:
    """The block's own forward must be ``down(act(gate(x)) * up(x))``, which the experts recompute: names alone
    matched blocks that scale or sparsify (Falcon-H1's multipliers, Gemma 3n's activation sparsity), and the
    model changed. Checked on two random tokens where the weights are plain float tensors that are there (not
    meta, sharded away or quantized: those blocks are taken by their names)."""
    gate, up, down = (getattr(block, name) for name in layout.projections())
    weights = [getattr(m, "weight", None) for m in (gate, up, down)]
    # plain float weights only: a quantized layer's inference forward changes its state (bitsandbytes repacks 4-bit
    # codes for its CPU kernel, which then served training with other gradients and saved them lossily)
    plain = (type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point() for w in weights)
    if not all(plain) or any(w.is_meta or w.numel() == 0 for w in weights):
        return
    x = torch.randn(1, 2, in_features, generator=torch.Generator().manual_seed(0)).to(
        weights[0].device, weights[0].dtype
    )
    training = block.training
    block.eval()
    try:
        got, want = block(x), down(getattr(block, layout.act)(gate(x)) * up(x))
    finally:
        block.train(training)
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-6):
        raise ValueError(
            f"Module '{module_name}' ({type(block).__name__}) has gate_proj, up_proj, down_proj and act_fn, but its "
            "forward computes more than down(act(gate(x)) * up(x)) (a scaling or activation sparsity), which "
            "whole-FFN experts would drop. Target its projections instead."
        )


class MoPEFFNLayer(MoPELayer):
    """Wraps a gated MLP block; per active adapter, route once, then mix whole-FFN experts."""

    @staticmethod
    def base_features(base_layer: nn.Module, module_name: str) -> tuple[int, int]:
        layout = ffn_block_layout(base_layer)
        if layout is None:
            raise ValueError(f"Module '{module_name}' is not a gated MLP block (gate_proj, up_proj, down_proj, act_fn)")
        features = projection_features(base_layer, layout, module_name)
        check_block_computes_layout(base_layer, layout, module_name, features[layout.gate][0])
        return features[layout.gate][0], features[layout.down][1]

    def make_bank(self, config, num_experts: int) -> nn.Module:
        if config.expert_type != "lora":
            raise ValueError(
                f"Module '{self.module_name}' is an MLP block: whole-FFN experts are LoRA experts, but "
                f"MoPEConfig.expert_type={config.expert_type!r}. Target its projections instead."
            )
        if ROUTERS[config.router].applies_experts:
            raise ValueError(
                f"MoPEConfig.router={config.router!r} applies experts itself and cannot drive whole-FFN experts "
                f"on MLP block '{self.module_name}'; target its projections instead."
            )
        layout = ffn_block_layout(self.base_layer)
        inner = projection_features(self.base_layer, layout, self.module_name)[layout.gate][1]
        return FFNExpertBank(self.in_features, inner, config, num_experts)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT finds no ``weight`` on an MLP block; follow its down projection's device and dtype, as PEFT
        follows a projection's: a bitsandbytes 4-bit layer's ``compute_dtype``, no cast for other packed weights."""
        down = getattr(self.base_layer, ffn_block_layout(self.base_layer).down)
        weight = down.weight
        dtype = getattr(down, "compute_dtype", None) or (weight.dtype if weight.is_floating_point() else None)
        for layer_name in self.adapter_layer_names:
            modules = getattr(self, layer_name)
            # not yet materialised (low_cpu_mem_usage=True: on the meta device until the bundle's tensors load), as
            # PEFT's own: moving them raised "Cannot copy out of meta tensor"
            if adapter_name in modules and not any(p.is_meta for p in modules.parameters()):
                modules[adapter_name] = modules[adapter_name].to(device or weight.device, dtype=dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [name for name in self.active_adapters if name in self.mope_experts]
        if self.disable_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        tokens = self.flattened_tokens(x)
        if tokens is not None:
            return self.forward(x.view(*tokens, x.shape[-1]), *args, **kwargs).flatten(0, 1)
        mlp, layout = self.base_layer, ffn_block_layout(self.base_layer)
        act, down = getattr(mlp, layout.act), getattr(mlp, layout.down)
        gate_out, up_out = getattr(mlp, layout.gate)(x), getattr(mlp, layout.up)(x)
        hidden = act(gate_out) * up_out
        flat = (x.reshape(-1, x.shape[-1]), gate_out.flatten(0, -2), up_out.flatten(0, -2), hidden.flatten(0, -2))
        inputs = self.routing_inputs(x)
        mixed, delta = None, 0
        for name in active:
            routing = self.route(name, x, inputs)
            weights = self.gate_weights(name, routing.weights).reshape(-1, self.mope_settings[name].num_experts)
            chosen = self.chosen_experts(name, routing)
            chosen = None if chosen is None else chosen.reshape(-1, chosen.shape[-1])
            bank = self.mope_experts[name]
            dtype = bank.gate.lora_A.dtype
            adapter_mixed, adapter_delta = bank.mix(*(t.to(dtype) for t in flat), weights, act, chosen)
            # several adapters: each adds its change to the frozen hidden state
            mixed = adapter_mixed if mixed is None else mixed + (adapter_mixed - flat[3].to(dtype))
            delta = delta + adapter_delta
            if self.routing_context is not None and self.training and name in self.mope_router:
                self._record_losses(self.routing_context, name, routing, inputs)
        out = down(mixed.to(hidden.dtype)) + delta  # the one pass of the frozen down projection
        return out.to(hidden.dtype).reshape(*x.shape[:-1], -1)


def layer_class_for(target: nn.Module) -> type[MoPELayer]:
    """Whole-FFN experts for a gated MLP block, per-module experts for everything else."""
    return MoPEFFNLayer if ffn_block_layout(target) is not None else MoPELayer
