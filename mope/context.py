"""Per-forward routing context shared by all MoPE layers of one model.

The tuner captures selected forward inputs (attention masks now; task ids and pooled
sequence representations extend the same table) in a forward pre-hook on the wrapped model,
so every call path (``PeftModel.forward``, ``generate``, a direct call of the base model) sees
the current batch. Layers read the token mask from here and record their aux losses here; the
tuner's forward hook sums the records onto the model output.

The inputs stay in place after the forward so that gradient-checkpointing recomputation in
the backward pass sees the same batch; records are only taken during the forward itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Forward arguments captured for the layers (they are also passed on to the model unchanged).
CAPTURED_INPUTS: tuple[str, ...] = ("attention_mask", "decoder_attention_mask")


@dataclass
class LossRecord:
    adapter_name: str
    loss_name: str
    value: torch.Tensor


@dataclass
class RoutingContext:
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[LossRecord] = field(default_factory=list)
    collecting: bool = False
    # (adapter name, block name) -> Routing of the block's leader layer in the current forward
    block_routings: dict[tuple[str, str], Any] = field(default_factory=dict)

    def begin(self, inputs: dict[str, torch.Tensor], collecting: bool) -> None:
        self.inputs = inputs
        self.records = []
        self.collecting = collecting
        self.block_routings = {}

    def token_mask(self, key: str, token_shape: torch.Size) -> torch.Tensor | None:
        """The ``[batch, seq]`` mask (1 = real token) for a layer input of leading shape ``token_shape``.

        With a KV cache the layer sees only the newest tokens while the attention mask covers
        past and new ones; the new tokens are its last columns. Inputs whose shape fits no
        mask (flattened tokens, 4-D masks) get None: every token counts.
        """
        mask = self.inputs.get(key)
        if mask is None or mask.dim() != 2 or len(token_shape) != 2 or mask.shape[0] != token_shape[0]:
            return None
        seq = token_shape[1]
        if mask.shape[1] < seq:
            return None
        return mask[:, -seq:] if mask.shape[1] > seq else mask

    def record(self, adapter_name: str, loss_name: str, value: torch.Tensor) -> None:
        """Keep ``value`` if a forward is collecting; outside one (e.g. a checkpointing recomputation) drop it."""
        if self.collecting:
            self.records.append(LossRecord(adapter_name, loss_name, value))
