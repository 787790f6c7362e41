"""The ``ExpertBank`` interface: all N experts of one module, and everything about their type.

A bank is the one place an expert type lives. Besides its forward (the mixture of the experts'
outputs) it says, by implementing a method or leaving the base class's refusal, whether and how
its experts can be

- *soft-merged* (``router='soft_merge'``): :meth:`soft_merged_delta` mixes the parameters once per
  sequence; a bank whose own forward already merges per token sets ``soft_merge = "token"``;
- run on Soft MoE *slots* (``router='soft_tokens'``): :meth:`slot_deltas`;
- *collapsed* into one LoRA (``mope.export_lora``): :meth:`lora_factors`;
- *folded* into the frozen base weight (``merge_and_unload``): :meth:`fold_into`, or a reason in
  :meth:`fold_blocker`.

The routers, the export and the layer ask the bank; no table outside the class names a type.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def merge_stacked(stacked: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_e g[b, e] * stacked[e]`` for ``stacked [N, ...]`` and ``g [batch, N]``: ``[batch, ...]``."""
    return (g.to(stacked.dtype) @ stacked.flatten(1)).reshape(g.shape[0], *stacked.shape[1:])


class ExpertBank(nn.Module):
    """Base class of expert types. A bank holds all experts of one module as stacked tensors.

    The layer calls, per forward, ``scale_input`` (only if ``scales_input``) before the base
    module and ``forward`` after it. ``weights [..., N]`` are the gate weights over all N experts
    (shared experts included, with weight 1), zero for experts a token does not use. ``chosen
    [..., k]``, where the gate gives it (:attr:`mope.routing.Routing.chosen`, shared experts
    appended), lists the experts a token's weights may be nonzero at; banks that compute only
    the chosen experts read it, the others ignore it.
    """

    scales_input: bool = False
    # whether its fold multiplies the weight ((IA)3): it does not commute with an additive fold, so the order counts
    folds_by_scaling: ClassVar[bool] = False
    # router='soft_merge': "sequence" merges the parameters once per sequence (soft_merged_delta),
    # "token" means forward already is the per-token merge (e.g. (IA)3's g L), None refuses.
    soft_merge: ClassVar[str | None] = None
    # router='soft_tokens': whether slot_deltas is implemented (experts that add a delta to the output).
    soft_tokens: ClassVar[bool] = False
    # mope.export_lora / collapse_to_lora: whether lora_factors is implemented; else what the experts
    # are, for "module 'x' has <no_lora_form>" (why no LoRA reproduces them).
    exports_lora: ClassVar[bool] = False
    no_lora_form: ClassVar[str] = "experts without a LoRA form"

    def __init__(self, in_features: int, out_features: int, config, num_experts: int, module_name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        # Dropout on the experts' input, one mask per layer for all experts; types that use
        # MoPEConfig.lora_dropout replace it (router='soft_tokens' applies it before mixing tokens).
        self.dropout: nn.Module = nn.Identity()

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """A tensor loaded in place of a frozen one stays frozen: transformers' ``load_adapter`` sets each tensor it
        loads as a new Parameter that requires grad, so frozen experts (``freeze_experts``) trained."""
        old = self._parameters.get(name) if "_parameters" in self.__dict__ else None
        if old is not None and param is not None and not old.requires_grad and param.is_leaf:
            param.requires_grad_(False)
        super().register_parameter(name, param)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def scale_input(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Input to give the base module (experts that act before it, e.g. (IA)³ on FFN inputs)."""
        return x

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The module's output given its input ``x`` and the base module's output."""
        raise NotImplementedError

    # soft merging (router='soft_merge') --------------------------------------------------------

    def soft_merged_delta(
        self, x: torch.Tensor, base_out: torch.Tensor, g: torch.Tensor, lora_mode: str
    ) -> torch.Tensor:
        """The merged expert's delta ``[batch, L, d_out]`` for ``x [batch, L, d_in]`` and per-sequence ``g [batch, N]``."""
        raise NotImplementedError(f"{type(self).__name__} experts cannot be soft-merged")

    def forward_soft_merged(
        self, x: torch.Tensor, base_out: torch.Tensor, weights: torch.Tensor, lora_mode: str = "factors"
    ) -> torch.Tensor:
        """The output with the experts' parameters merged by ``weights`` (router='soft_merge').

        ``weights [..., N]`` are per-sequence gate weights broadcast over the token dims (routing
        level ``sequence`` or ``task``), so the first token's row is the example's. A bank with
        ``soft_merge = "token"`` takes them per token, as they are.
        """
        if self.soft_merge == "token":
            return self(x, base_out, weights)
        batch = x.shape[0]
        g = weights.reshape(batch, -1, weights.shape[-1])[:, 0]  # [batch, N]: one merge per sequence
        delta = self.soft_merged_delta(
            x.reshape(batch, -1, x.shape[-1]), base_out.reshape(batch, -1, base_out.shape[-1]), g, lora_mode
        )
        return base_out + delta.reshape(base_out.shape).to(base_out.dtype)

    def soft_merged_lora(self, g: torch.Tensor, lora_mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp64 ``(A [R, d_in], B [d_out, R])`` of the one update :meth:`soft_merged_delta` applies for a
        constant merge ``g [N]``, where that update is not the mixture of the experts' updates
        (:meth:`lora_factors`, :meth:`fold_into`); None where it is (the default)."""
        return None

    # Soft MoE slots (router='soft_tokens') -----------------------------------------------------

    def slot_deltas(self, xs: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        """Each slot's expert delta ``[batch, N, p, d_out]`` for slot inputs ``xs [batch, N, p, d_in]``.

        ``zs`` are the slots' base outputs (for experts that read the module's output).
        """
        raise NotImplementedError(f"{type(self).__name__} experts cannot run on Soft MoE slots")

    # collapse to one LoRA (mope.export_lora) ---------------------------------------------------

    def lora_factors(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp64 ``(A [R, d_in], B [d_out, R])`` with ``B @ A = s sum_e u_e dW_e`` for usage ``u [N]``."""
        raise NotImplementedError(f"{type(self).__name__} has {self.no_lora_form}")

    # folding into the base weight (merge_and_unload) -------------------------------------------

    def fold_blocker(self) -> str | None:
        """Why this expert type can never be folded into the base weight, or None if it can."""
        if type(self).fold_into is ExpertBank.fold_into:
            return f"{type(self).__name__} does not implement fold_into: its experts cannot be folded into a weight"
        return None

    def fold_into(
        self, weight: torch.Tensor, bias: torch.Tensor | None, weights: torch.Tensor, sign: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Base ``weight [d_out, d_in]`` and ``bias`` with (sign=1) or without (sign=-1) the experts folded in,
        for input-independent gate weights ``[N]``."""
        raise NotImplementedError

    def unfolds(self, weights: torch.Tensor) -> bool:
        """Whether ``fold_into(..., sign=-1)`` undoes the fold with gate weights ``weights`` (else the layer keeps a copy)."""
        return True
