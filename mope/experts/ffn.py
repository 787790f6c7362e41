"""Whole-FFN experts (MixLoRA, Li et al. 2024): each expert is a gated MLP with its own LoRAs.

The bank holds a LoRA stack per projection; :mod:`mope.ffn_layer` wraps the MLP block, runs its
frozen projections once and hands their outputs to :meth:`FFNExpertBank.mix`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dispatch import sort_pairs
from .base import ExpertBank
from .lora import LoRAExpertBank

PROJECTIONS = ("gate", "up", "down")


def drop_repeated_adapter_name(state_dict: dict, prefix: str, *args: Any) -> None:
    """Saved keys keep the adapter name ("mope_experts.<name>.gate.lora_A"); PEFT < 0.21 inserts it again
    when loading ("mope_experts.<name>.<name>.gate.lora_A"): drop the repeated one. The bank's own keys are
    ``<projection>.<tensor>``, so the extra part goes whatever it is (an adapter named 'down' too)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        parts = key[len(prefix) :].split(".")
        if len(parts) == 3 and parts[1] in PROJECTIONS:
            state_dict[prefix + ".".join(parts[1:])] = state_dict.pop(key)


class FFNExpertBank(ExpertBank):
    """N whole-FFN experts: a LoRA stack per projection (``gate``, ``up``: d -> F; ``down``: F -> d).

    :class:`mope.ffn_layer.MoPEFFNLayer` runs the frozen MLP around it and calls :meth:`mix`.
    """

    no_lora_form = (
        "whole-FFN experts (an MLP block was targeted); they mix nonlinear blocks, so no single LoRA reproduces "
        "them. Target the MLP's projections to collapse"
    )

    def __init__(self, hidden: int, inner: int, config, num_experts: int) -> None:
        super().__init__(hidden, hidden, config, num_experts)
        self.gate = LoRAExpertBank(hidden, inner, config, num_experts)
        self.up = LoRAExpertBank(hidden, inner, config, num_experts)
        self.down = LoRAExpertBank(inner, hidden, config, num_experts)
        self._register_load_state_dict_pre_hook(drop_repeated_adapter_name)  # PEFT < 0.21

    def fold_blocker(self) -> str | None:
        return "whole-FFN experts mix nonlinear blocks; no update of the base weights reproduces them"

    @staticmethod
    def lora(bank: LoRAExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
        return (x @ bank.lora_A[e].t()) @ bank.lora_B[e] * bank.scaling

    def mix(
        self,
        x: torch.Tensor,
        gate_out: torch.Tensor,
        up_out: torch.Tensor,
        hidden: torch.Tensor,
        weights: torch.Tensor,
        act: Any,
        chosen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For flat tokens: ``sum_e g_e h_e + (1 - sum_e g_e) h`` and ``sum_e g_e s dW2_e h_e``.

        ``x [T, d]``; ``gate_out``, ``up_out``, ``hidden [T, F]`` are the base MLP's ``W1 x``, ``W3 x``
        and ``act(W1 x) * W3 x``; ``weights [T, N]`` the gate weights (zero where unused);
        ``chosen [T, k]`` the gate's chosen experts, or None (then the nonzero weights are found).
        """
        pairs = sort_pairs(weights, 1.0, hidden.dtype, chosen)
        index = pairs.token
        # input dropout as every LoRA bank draws it: one mask per projection, shared by all experts (a token's
        # experts drew one each); the down projection's on the hidden units, drawn for every token once
        gate_x, up_x = self.gate.dropout(x), self.up.dropout(x)
        keep = None if isinstance(self.down.dropout, nn.Identity) else self.down.dropout(torch.ones_like(hidden))
        inputs = (gate_x, up_x, gate_out, up_out) + (() if keep is None else (keep,))
        split = [t.index_select(0, index).split(pairs.sizes) for t in inputs]
        states, deltas = [], []
        for e, (gx, ux, gs, us, *kept) in enumerate(zip(*split, strict=True)):
            if not pairs.sizes[e]:
                continue
            h = act(gs + self.lora(self.gate, e, gx)) * (us + self.lora(self.up, e, ux))
            states.append(h)
            deltas.append(self.lora(self.down, e, h * kept[0] if kept else h))
        if not states:  # no token uses any expert (e.g. all dropped): the frozen MLP alone
            return hidden, hidden.new_zeros(hidden.shape[0], self.down.lora_B.shape[-1])
        remainder = (1.0 - weights.sum(-1, keepdim=True)).to(hidden.dtype)
        mixed = (hidden * remainder).index_add(0, index, torch.cat(states) * pairs.gate)
        delta = torch.cat(deltas) * pairs.gate
        return mixed, delta.new_zeros(hidden.shape[0], delta.shape[-1]).index_add(0, index, delta)
