"""Per-forward routing context shared by all MoPE layers of one model.

The tuner captures selected forward inputs (attention masks, token ids, task and group ids: the
table ``CAPTURED_INPUTS``) in a forward pre-hook on the wrapped model,
so every call path (``PeftModel.forward``, ``generate``, a direct call of the base model) sees
the current batch. Layers read the token mask from here and record what their aux losses need
here; the tuner's forward hook computes the losses and adds them to the model output.

The inputs stay in place after the forward so that gradient-checkpointing recomputation in
the backward pass sees the same batch; records are only taken during the forward itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import RoutingInputs
from .levels import DecisionCache


@dataclass(frozen=True)
class CapturedInput:
    """A forward argument the tuner's pre-hook records for the routers.

    ``consumed``: the argument is mope's own (the base model does not know it), so the pre-hook
    removes it from the call; otherwise it is passed on unchanged.
    """

    name: str
    consumed: bool = False


CAPTURED_INPUTS: tuple[CapturedInput, ...] = (
    CapturedInput("attention_mask"),
    CapturedInput("decoder_attention_mask"),
    CapturedInput("input_ids"),
    CapturedInput("decoder_input_ids"),
    CapturedInput("task_ids", consumed=True),
    CapturedInput("group_ids", consumed=True),
)
# The token ids that go with the tokens an attention mask covers (hash routing reads them).
TOKEN_IDS_FOR_MASK: dict[str, str] = {"attention_mask": "input_ids", "decoder_attention_mask": "decoder_input_ids"}


@dataclass
class LossRecord:
    """What one layer's aux loss needs, kept during the forward; the loss itself is computed after it.

    Computing every layer's loss at the end, batched over the layers (``AuxLoss.values``), takes a
    handful of kernels instead of a dozen per layer: on a GPU a step is mostly kernel launches.
    """

    adapter_name: str
    loss_name: str
    routing: Any  # mope.routing.Routing
    mask: torch.Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoutingContext:
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[LossRecord] = field(default_factory=list)
    collecting: bool = False
    # (adapter name, block name) -> Routing of the block's leader layer in the current forward
    block_routings: dict[tuple[str, str], Any] = field(default_factory=dict)
    # inputs given around a call rather than to the base model (PEFT's forward drops task_ids; generate)
    given: dict[str, torch.Tensor] = field(default_factory=dict)
    # sequence-level decisions kept across forwards (KV-cache steps, generate)
    decisions: DecisionCache = field(default_factory=DecisionCache)

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

    def aligned(self, key: str, token_shape: torch.Size) -> torch.Tensor | None:
        """Input ``key`` (``[batch, seq]``) cut to the layer's tokens: its last columns, as for the mask."""
        value = self.inputs.get(key)
        if value is None or value.dim() != 2 or len(token_shape) != 2 or value.shape[0] != token_shape[0]:
            return None
        return value[:, -token_shape[1] :] if value.shape[1] >= token_shape[1] else None

    def routing_inputs(self, mask_key: str, token_shape: torch.Size) -> RoutingInputs:
        """Everything a router of a layer whose tokens the mask ``mask_key`` covers may look at."""
        mask = self.inputs.get(mask_key)
        cache_step = mask is not None and mask.dim() == 2 and len(token_shape) == 2 and mask.shape[1] > token_shape[1]
        return RoutingInputs(
            token_mask=self.token_mask(mask_key, token_shape),
            token_ids=self.aligned(TOKEN_IDS_FOR_MASK.get(mask_key, "input_ids"), token_shape),
            task_ids=self.inputs.get("task_ids"),
            group_ids=self.inputs.get("group_ids"),
            cache_step=bool(cache_step),
            decisions=self.decisions,
        )

    @contextmanager
    def giving(self, **inputs: torch.Tensor) -> Iterator[None]:
        """Make ``inputs`` part of every forward captured inside the block (they override nothing passed directly)."""
        previous = self.given
        self.given = {**previous, **{k: v for k, v in inputs.items() if v is not None}}
        try:
            yield
        finally:
            self.given = previous

    def record(self, record: LossRecord) -> None:
        """Keep ``record`` if a forward is collecting; outside one (e.g. a checkpointing recomputation) drop it."""
        if self.collecting:
            self.records.append(record)
