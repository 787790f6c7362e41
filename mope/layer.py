"""``MoPELayer``: a frozen base module plus, per adapter, an expert bank and a router."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .base_layers import BaseLayerType, base_layer_type, check_base_layer, keep_stored, restore_stored
from .base_layers import supported_base_layer as supported_base_layer  # injection.py and reuse.py import it from here
from .experts import EXPERT_BANKS
from .experts.lora import LoRAExpertBank
from .kernels import triton_unavailable
from .losses import AUX_LOSSES, SUMMED_LOSSES, AuxLoss, LossSums, cached_token_weights
from .peft_compat import PEFT_KEEPS_FROZEN
from .routing import ROUTERS, RoutingInputs
from .routing.base import full_softmax
from .routing.context import LossRecord, RoutingContext
from .routing.levels import ROUTING_LEVELS
from .routing.top_k import KERNEL_ORDERS, TopKRouter


def hooked(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) would see a call of ``module``."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


@dataclass(frozen=True)
class AdapterSettings:
    """What one adapter resolved to on one module (after the config's per-module patterns)."""

    num_experts: int
    num_shared: int
    top_k: int
    aux_losses: tuple[AuxLoss, ...]  # those with a nonzero coefficient
    summed_losses: bool  # all of them are ones the router kernel's sums serve (mope.losses.LossSums)


@dataclass
class BlockLink:
    """Block-level routing: the layers of one block share the router of its leader (the first adapted layer)."""

    block: str
    leader: MoPELayer


class MoPELayer(nn.Module, BaseTunerLayer):
    """Wraps a base layer of :mod:`mope.base_layers` (``nn.Linear``, ``Conv1D``, bitsandbytes 4-bit / 8-bit):
    per active adapter, route then apply the expert bank."""

    adapter_layer_names = ("mope_experts", "mope_router")
    frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}  # PEFT 0.19's BaseTunerLayer lacks it
    other_param_names = ("mope_settings", "mope_block")

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
        self.in_features, self.out_features = self.base_features(base_layer, module_name)
        self.base_layer = base_layer
        self.mope_experts = nn.ModuleDict()
        self.mope_router = nn.ModuleDict()
        self.mope_settings: dict[str, AdapterSettings] = {}
        self.mope_block: dict[str, BlockLink] = {}  # plain dict: the leader must not become a submodule
        self.routing_context = context
        self.mask_key = mask_key
        self.module_name = module_name
        self.merged_adapters: list[str] = []
        self.merged_gates: dict[str, torch.Tensor] = {}  # the gate each merge used, so unmerge undoes exactly that
        # the base before a fold unmerge restores (a quantized base, an (IA)^3 scale of 0), its bias, the folds before it
        self.unfolded_base: tuple[Any, torch.Tensor | None, int] | None = None
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.fused_check: FusedCheck | None = None  # set where a call fused (eager): what the next call re-checks
        self.update_layer(adapter_name, config)

    @staticmethod
    def base_features(base_layer: nn.Module, module_name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of a module experts can wrap; ValueError naming it otherwise."""
        if isinstance(base_layer, BaseTunerLayer):  # another PEFT method's layer (a MoPE one is updated in place)
            kind = f"{type(base_layer).__module__}.{type(base_layer).__qualname__}"
            raise ValueError(
                f"Module '{module_name}' already carries a PEFT adapter of another method ({kind}); MoPE experts "
                "wrap plain (or bitsandbytes-quantized) linear layers. Merge or unload that adapter first "
                "(model.merge_and_unload()), or leave this module out of target_modules."
            )
        return check_base_layer(base_layer, module_name).features(base_layer)

    @property
    def base_type(self) -> BaseLayerType:
        """How to read and write the base layer's weight (:mod:`mope.base_layers`)."""
        return check_base_layer(self.get_base_layer(), self.module_name)

    @property
    def weight_transposed(self) -> bool:
        found = base_layer_type(self.get_base_layer())
        return found is not None and found.transposed

    def make_bank(self, config, num_experts: int) -> nn.Module:
        return EXPERT_BANKS[config.expert_type](
            self.in_features, self.out_features, config, num_experts, module_name=self.module_name
        )

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        num_experts, top_k = config.module_settings(self.module_name)
        num_shared = config.num_shared_experts
        self.mope_experts[adapter_name] = self.make_bank(config, num_experts)
        router_features = ROUTING_LEVELS[config.routing_level].router_features(self.in_features, config)
        self.mope_router[adapter_name] = ROUTERS[config.router](
            router_features, num_experts - num_shared, top_k, config
        )
        router = self.mope_router[adapter_name]
        bank = self.mope_experts[adapter_name]
        if hasattr(bank, "active_experts"):  # dispatch hint (mope.dispatch.auto_dispatch): nonzeros per token
            most_k = max(top_k, config.router_schedule_start_top_k or 0)
            bank.active_experts = min(num_experts, most_k + num_shared) if router.sparse_weights else num_experts
        aux_losses = tuple(loss for loss in AUX_LOSSES if getattr(config, loss.coef_field) != 0)
        summed = SUMMED_LOSSES.issuperset(loss.name for loss in aux_losses)
        self.mope_settings[adapter_name] = AdapterSettings(num_experts, num_shared, top_k, aux_losses, summed)
        if config.freeze_experts:  # PEFT re-freezes these after each set_adapter and mark-trainable pass
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: ("mope_experts",)}
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        self.fused_check = None  # the adapters changed: the next call takes the full path

    def keep_frozen(self) -> None:
        """PEFT 0.19 only: freeze again what ``frozen_peft_weight_names`` names (PEFT >= 0.20 does it itself)."""
        if PEFT_KEEPS_FROZEN:
            return
        for adapter_name, layer_names in self.frozen_peft_weight_names.items():
            for layer_name in layer_names:
                if adapter_name in getattr(self, layer_name):
                    getattr(self, layer_name)[adapter_name].requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.fused_check = None  # it would keep a deleted router and bank alive

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.keep_frozen()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self.keep_frozen()

    def gate_weights(self, adapter_name: str, routed: torch.Tensor) -> torch.Tensor:
        """Weights over all experts: the router's over the routed ones, then 1 for each shared expert."""
        num_shared = self.mope_settings[adapter_name].num_shared
        if num_shared == 0:
            return routed
        return torch.cat([routed, routed.new_ones((*routed.shape[:-1], num_shared))], dim=-1)

    def chosen_experts(self, adapter_name: str, routing) -> torch.Tensor | None:
        """The routing's chosen experts ``[..., k]``, then every shared expert (they always act), or None."""
        chosen, num_shared = routing.chosen, self.mope_settings[adapter_name].num_shared
        if chosen is None or num_shared == 0:
            return chosen
        routed = self.mope_settings[adapter_name].num_experts - num_shared
        shared = torch.arange(routed, routed + num_shared, device=chosen.device)
        return torch.cat([chosen, shared.expand(*chosen.shape[:-1], num_shared)], dim=-1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        tokens = self.flattened_tokens(x)
        if tokens is not None:
            return self.forward(x.view(*tokens, x.shape[-1]), *args, **kwargs).flatten(0, 1)
        if not torch.compiler.is_compiling():  # a compiled graph must not read it: each new check would recompile
            check = self.fused_check
            if check is not None and check.holds(self, x):
                adapter_x = x if x.dtype == torch.float32 else x.float()  # adapter_input's, as the experts are fp32
                return self.fused_forward(
                    check.router, check.bank, check.adapter_name, x, adapter_x, None, *args, **kwargs
                )
        active = [name for name in self.active_adapters if name in self.mope_experts]
        inputs = self.routing_inputs(x)
        adapter_x = self.adapter_input(x, active)
        if len(active) == 1 and self.fuses(active[0], adapter_x):
            name = active[0]
            if not torch.compiler.is_compiling():
                self.fused_check = FusedCheck(self, name)
            router, bank = self.mope_router[name], self.mope_experts[name]
            return self.fused_forward(router, bank, name, x, adapter_x, inputs, *args, **kwargs)
        routings = {name: self.route(name, adapter_x, inputs) for name in active}
        weights = {name: self.gate_weights(name, routings[name].weights) for name in active}
        base_input = x
        for name in active:
            bank = self.mope_experts[name]
            if bank.scales_input:
                base_input = bank.scale_input(base_input, weights[name])
        result = self.base_layer(base_input, *args, **kwargs)
        for name in active:
            router, bank = self.router_for(name), self.mope_experts[name]
            if router.applies_experts:  # soft_merge / soft_tokens apply the bank themselves
                result = router.apply_experts(bank, adapter_x, result, routings[name], weights[name])
            else:
                result = bank(adapter_x, result, weights[name], self.chosen_experts(name, routings[name]))
        ctx = self.routing_context
        if ctx is not None and self.training:
            for name in active:
                if name in self.mope_router:  # block followers reuse the leader's routing: count it once
                    self._record_losses(ctx, name, routings[name], inputs)
        return result

    def fuses(self, adapter_name: str, x: torch.Tensor) -> bool:
        """Whether the adapter's router and experts run as one kernel call (:mod:`mope.kernels.layer`).

        Only where that call computes what the two modules would: a top-k router the router kernel
        serves (see :meth:`~mope.routing.TopKRouter.kernel_applies`) with no capacity, routing each
        token, its own (no block routing), no hooks on it or the bank (analysis collectors read the
        router's output); fp32 LoRA experts with ``dispatch='triton'``, no dropout, no shared
        experts. Under ``torch.compile`` too (the custom op ``mope::routed_layer``, or
        ``mope::routed_grouped_layer`` where only the chosen experts are computed).
        """
        bank = self.mope_experts[adapter_name]
        if getattr(bank, "dispatch", None) != "triton" or adapter_name in self.mope_block:
            return False
        if type(bank) is not LoRAExpertBank or not isinstance(bank.dropout, nn.Identity):
            return False
        router = self.mope_router[adapter_name]  # not a block follower: its own router
        if not isinstance(router, TopKRouter) or type(router).decide is not TopKRouter.decide:
            return False
        if router.capacity_factor is not None or router.level.name != "token":
            return False
        if self.mope_settings[adapter_name].num_shared or hooked(router) or hooked(bank):
            return False
        return x.dtype == bank.lora_A.dtype == torch.float32 and router.kernel_applies(x)

    def fused_forward(self, router, bank, adapter_name: str, x, adapter_x, inputs, *args, **kwargs) -> torch.Tensor:
        """The base layer, then the router and experts in one kernel call; the routing recorded as usual.

        A few tokens with no gradient and nothing to record (decoding) take one kernel for both
        (:mod:`mope.kernels.decode`), the rest the training path's (:mod:`mope.kernels.layer`).
        Modules and parameters are read from their dicts: an attribute read of a submodule or parameter
        first fails in Python, then goes through ``nn.Module.__getattr__`` (about 1 us each, per call).
        """
        decodes, routed_decode, routed_layer = fused_kernels()
        result = self._modules["base_layer"](x, *args, **kwargs)
        factors = (parameter(router, "weight"), parameter(bank, "lora_A"), parameter(bank, "lora_B"))
        operands = (*factors, result, router.top_k, router.temperature, KERNEL_ORDERS[router.order])
        ctx = self.routing_context
        recording = ctx is not None and self.training
        if not recording and decodes(adapter_x):
            return routed_decode(adapter_x, *operands, bank.scaling)
        settings = self.mope_settings[adapter_name]
        wanted = settings.aux_losses if recording else ()  # nothing else reads the routing
        # the router kernel sums what the default losses need (not the compiled op); those read only the mask
        summing = bool(wanted) and settings.summed_losses and not torch.compiler.is_compiling()
        if summing and inputs is None:
            inputs = RoutingInputs(token_mask=ctx.token_mask(self.mask_key, x.shape[:-1]))
        elif wanted and inputs is None:
            inputs = self.routing_inputs(x)
        sums = None
        if summing:
            sums = LossSums(cached_token_weights(inputs.token_mask, torch.float32, ctx.call.token_weights))
        routes = bool(wanted) and not summing  # the losses read the logits, weights and chosen experts
        out, logits, weights, chosen, stats = routed_layer(adapter_x, *operands, bank.scaling, sums, routes)
        if wanted:
            routing = (
                sums if stats is not None else router.routing(logits, full_softmax(logits), weights, chosen, inputs)
            )
            self._record_losses(ctx, adapter_name, routing, inputs)
        return out

    def adapter_input(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """``x`` in fp32 once for the routers (which score in fp32) and fp32 experts, if it is not already.

        One cast instead of one per router and bank: a half-precision model then keeps one fp32
        copy of each adapted layer's input for the backward, as a PEFT LoRA does, not two.
        """
        if x.dtype == torch.float32 or not all(self.mope_experts[n].dtype == torch.float32 for n in active):
            return x
        return x.float()

    def flattened_tokens(self, x: torch.Tensor) -> tuple[int, int] | None:
        """``(batch, seq)`` where ``x`` is ``[batch * seq, hidden]``: the block flattened its tokens (Qwen2-MoE's
        shared expert). The layer then runs on the ``[batch, seq, hidden]`` view, so that padding is masked and a
        sequence-level gate pools each sequence, as on any other layer."""
        ctx = self.routing_context
        if ctx is None or x.dim() != 2:
            return None
        return ctx.flattened(self.mask_key, x.shape[:-1])

    def routing_inputs(self, x: torch.Tensor) -> RoutingInputs:
        ctx = self.routing_context
        if ctx is None:
            return RoutingInputs()
        return ctx.routing_inputs(self.mask_key, x.shape[:-1])

    def route(self, adapter_name: str, x: torch.Tensor, inputs: RoutingInputs):
        """This layer's routing; with block-level routing the leader routes and the others reuse it."""
        link = self.mope_block.get(adapter_name)
        if link is None:
            return self.mope_router[adapter_name](x, inputs)
        key = (adapter_name, link.block)
        ctx = self.routing_context
        if link.leader is self:
            routing = self.mope_router[adapter_name](x, inputs)
            ctx.block_routings[key] = routing
            return routing
        routing = ctx.block_routings.get(key)
        if routing is None or routing.weights.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(
                f"Block-level routing of block '{link.block}': module '{self.module_name}' ran before the block's "
                f"router on '{link.leader.module_name}' in this forward pass (or on other tokens). Route a block whose "
                "first adapted module runs first, or adapt the block's modules without router_blocks."
            )
        return routing

    def router_for(self, adapter_name: str):
        link = self.mope_block.get(adapter_name)
        return self.mope_router[adapter_name] if link is None else link.leader.mope_router[adapter_name]

    def _record_losses(self, ctx: RoutingContext, adapter_name: str, routing, inputs: RoutingInputs) -> None:
        """Keep what this layer's aux losses need; the tuner computes them after the forward, all layers at once.

        No loss op runs here, so a gradient-checkpointing recomputation (which ``ctx.record``
        ignores) runs exactly the ops of the forward.
        """
        for loss in self.mope_settings[adapter_name].aux_losses:
            # a loss that needs more than the mask (e.g. group labels) gets it from the inputs and router
            extra = loss.extra(inputs, self.router_for(adapter_name)) if loss.extra is not None else {}
            ctx.record(LossRecord(adapter_name, loss.name, routing, inputs.token_mask, extra))

    # folding into the base weight (PEFT calls it merging: merge, unmerge, merge_and_unload) ------

    def fold_blocker(self, adapter_name: str) -> str | None:
        """Why ``adapter_name`` cannot be merged into the base weight here, or None if it can."""
        bank_blocker = self.mope_experts[adapter_name].fold_blocker()
        if bank_blocker is not None:
            return f"module '{self.module_name}': adapter '{adapter_name}': {bank_blocker}"
        router = self.router_for(adapter_name)
        if router.weights_need_the_batch():
            return (
                f"module '{self.module_name}': adapter '{adapter_name}': {type(router).__name__} routes a token by "
                "the rest of its batch (expert capacity that may drop it, expert choice, or Soft MoE's slots), "
                "so no single weight update reproduces it"
            )
        if router.fixed_weights() is None:
            hint = "; fix one task first with mope.fix_task(model, task_id)" if router.level.name == "task" else ""
            return (
                f"module '{self.module_name}': adapter '{adapter_name}' routes by input "
                f"({type(router).__name__} over {router.num_experts} experts), so no single weight update "
                f"reproduces it{hint}"
            )
        return None

    def _base_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.get_base_layer()
        return self.base_type.read_weight(base), base.bias.data if getattr(base, "bias", None) is not None else None

    def _merged_weight(
        self, adapter_name: str, sign: int, gate: torch.Tensor, start: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias (or ``start``'s) with ``adapter_name`` folded in (``sign=1``) or out (-1), with the
        gate it was (is) folded with."""
        weight, bias = start or self._base_weight()
        bank = self.mope_experts[adapter_name]
        gate = gate.to(next(bank.parameters(), weight).device)  # kept by a merge before the model moved
        merged = self.router_for(adapter_name).merged_lora(bank, gate)  # e.g. soft_merge_lora='factors'
        if merged is not None:
            a, b = merged
            return weight + sign * (b @ a).to(weight.device, weight.dtype), bias
        return bank.fold_into(weight, bias, gate, sign)

    def _fold_order(self, adapter_names: list[str]) -> list[str]:
        names = [name for name in adapter_names if name in self.mope_experts]
        # the forward scales the base's input for every (IA)^3 input scaling, then applies the others in the active
        # adapters' order (an (IA)^3 output scaling scales what came before it): fold in that order, W diag(l) + dW
        # (LoRA first gave (W + dW) diag(l), scaling the LoRA's input too)
        active = [name for name in self.active_adapters if name in names]
        rest = [name for name in names if name not in active]
        return sorted(active + rest, key=lambda name: not self.mope_experts[name].scales_input)

    def fold_order_problem(self, adapter_names: list[str] | None) -> str | None:
        """Why folding ``adapter_names`` (the active adapters if None) after those already merged here would give
        another model than the forward, or None: the forward puts one of them before those, and an (IA)^3 scaling
        makes the order count (each merge call folds into what the base holds)."""
        merged = [name for name in self.merged_adapters if name in self.mope_experts]
        wanted = adapter_names if adapter_names is not None else self.active_adapters
        names = self._fold_order([name for name in wanted if name not in merged])
        order = self._fold_order(merged + names)
        scaling = {name: self.mope_experts[name].folds_by_scaling for name in order}
        folds = merged + names
        # only a scaling and an additive fold fail to commute: the order counts for such a pair alone
        if not any(
            scaling[a] != scaling[b] and folds.index(a) > folds.index(b)
            for i, a in enumerate(order)
            for b in order[i + 1 :]
        ):
            return None
        return (
            f"module '{self.module_name}' would fold {names} after {merged}, but the forward applies them in the "
            f"order {order} and an (IA)3 scaling makes the order count; unmerge_adapter(), then merge them in one "
            "call (merge_adapter(adapter_names=[...]))"
        )

    def unsafe_merge(self, adapter_names: list[str] | None) -> str | None:
        """What would make merging ``adapter_names`` give non-finite weights here (folded in order, as ``merge``
        does, nothing written), or None: ``safe_merge`` checks every layer before merging any."""
        wanted = adapter_names if adapter_names is not None else self.active_adapters
        names = self._fold_order([name for name in wanted if name not in self.merged_adapters])
        start = self._base_weight() if names else None
        for name in names:
            gate = self.gate_weights(name, self.router_for(name).fixed_weights())
            start = self._merged_weight(name, sign=1, gate=gate, start=start)
            if not torch.isfinite(start[0]).all():
                return f"merging adapter '{name}' into '{self.module_name}' gives non-finite weights"
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._fold_order(check_adapters_to_merge(self, adapter_names))
        if (problem := self.fold_order_problem(adapter_names)) is not None:
            raise ValueError(f"Cannot merge: {problem}.")
        for name in names:  # check all before changing anything
            blocker = self.fold_blocker(name)
            if blocker is not None:
                raise ValueError(f"Cannot merge: {blocker}.")
        for name in names:
            gate = self.gate_weights(name, self.router_for(name).fixed_weights())
            weight, bias = self._merged_weight(name, sign=1, gate=gate)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"Merging adapter '{name}' into '{self.module_name}' gives non-finite weights.")
            self._keep_unfolded_base(exact=not self.mope_experts[name].unfolds(gate))
            self._write_base(weight, bias)
            self.merged_adapters.append(name)
            self.merged_gates[name] = gate

    def unmerge(self) -> None:
        if self.unfolded_base is not None:  # a quantized base (or a fold no subtraction undoes): put it back, exactly
            base, (kept, bias, folded_before) = self.get_base_layer(), self.unfolded_base
            (self.base_type.restore or restore_stored)(base, kept)
            if bias is not None:
                base.bias.data.copy_(bias)
            self.unfolded_base = None
            for name in self.merged_adapters[folded_before:]:
                self.merged_gates.pop(name, None)
            del self.merged_adapters[folded_before:]
        while self.merged_adapters:  # an adapter counts as merged until its fold is undone (an error leaves it)
            name = self.merged_adapters[-1]
            if name in self.mope_experts:
                self._write_base(*self._merged_weight(name, sign=-1, gate=self.merged_gates[name]))
            self.merged_adapters.pop()
            self.merged_gates.pop(name, None)

    def _keep_unfolded_base(self, exact: bool = False) -> None:
        """Before the first fold into a base that re-quantizes on writing, or one that unfolding cannot undo
        (``exact``): keep what unmerge restores. A later fold of an earlier-kept base keeps nothing more."""
        base_type, base = self.base_type, self.get_base_layer()
        keep = base_type.keep or (keep_stored if exact else None)
        if keep is None or self.unfolded_base is not None:
            return
        bias = getattr(base, "bias", None)
        # with the adapters folded before it: restoring it undoes only the later folds
        self.unfolded_base = (keep(base), None if bias is None else bias.detach().clone(), len(self.merged_adapters))

    def _write_base(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.get_base_layer()
        self.base_type.write_weight(base, weight)
        if bias is not None:
            base.bias.data.copy_(bias)

    def __repr__(self) -> str:
        return "mope." + super().__repr__()


def parameter(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, from its parameter dict where it is there (a parametrized one is a property: the attribute)."""
    found = module._parameters.get(name)
    return found if found is not None else getattr(module, name)


@functools.cache
def fused_kernels() -> tuple:
    """``(decodes, routed_decode, routed_layer)``, imported at a layer's first fused call (they import Triton)."""
    from .kernels.decode import decodes, routed_decode
    from .kernels.layer import routed_layer

    return decodes, routed_decode, routed_layer


class FusedCheck:
    """What a layer re-checks on an eager call to fuse again as its last call did (:meth:`MoPELayer.fused_forward`).

    The full path to a fused call (:meth:`MoPELayer.fuses` and the routing inputs before it) checks some twenty
    conditions. Most cannot change while the same router and bank serve the adapter: their types and options
    and the adapter's settings. This re-checks the rest: the active adapters (the layer's forward has checked
    disabled and merged ones), the same router and bank, the dispatch, hooks, the router's training mode (noise
    and jitter), the experts' dtype and the input's device. Where one fails, the layer takes its full path.
    Host time of a tiny Llama's eager training step (``dispatch='triton'``, launches skipped; MoPE top-2 of 8
    / LoRA r=16): 1.70x -> 1.62x with the router losses, 1.49x -> 1.36x without.
    """

    def __init__(self, layer: MoPELayer, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self.active = layer._active_adapter
        self.router, self.bank = layer.mope_router[adapter_name], layer.mope_experts[adapter_name]
        self.noisy = self.router.noise_weight is not None or self.router.jitter > 0
        self.device: torch.device | None = None  # the last device the kernels were found to run on

    def holds(self, layer: MoPELayer, x: torch.Tensor) -> bool:
        router, bank = self.router, self.bank
        if layer._active_adapter != self.active:  # (disabled and merged adapters: MoPELayer.forward first)
            return False
        if layer._modules["mope_router"]._modules.get(self.adapter_name) is not router:
            return False
        if layer._modules["mope_experts"]._modules.get(self.adapter_name) is not bank:
            return False
        if bank.dispatch != "triton" or router.dispatch != "triton" or hooked(router) or hooked(bank):
            return False
        if (router.training and self.noisy) or bank.lora_A.dtype != torch.float32 or x.numel() == 0:
            return False
        device = x.device
        if device != self.device:  # each GPU: a machine may mix GPUs the kernels run on with ones they refuse
            if triton_unavailable(device) is not None:
                return False
            self.device = device
        return True
