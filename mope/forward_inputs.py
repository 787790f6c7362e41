"""How mope's own forward inputs (``task_ids``, ``group_ids``) reach the routers, and ``generate``.

The tuner's pre-hook on the wrapped model captures the inputs listed in
:data:`mope.routing.context.CAPTURED_INPUTS` and removes the ones the base model does not know. Two
paths need help:

- PEFT's task classes (``PeftModelForCausalLM``, ``...ForSequenceClassification``, ...) declare
  ``task_ids`` as a named argument and pass it on only for ``PeftType.POLY``; for any other
  method they drop it. :func:`install` wraps their ``forward`` once, at ``import mope``: for a
  model whose tuner is mope's, ``task_ids`` is *given* to the routing context for the call
  (``RoutingContext.giving``); other models are untouched. A test fails if PEFT renames things.
- ``generate`` calls the model many times and may call the encoder of an encoder-decoder model
  directly; :func:`generate_with_routing` takes mope's inputs out of the generation kwargs, gives
  them to every step, and pins sequence-level decisions to the prompt.

Hugging Face's ``Trainer`` keeps only dataset columns named in the base model's ``forward``
signature: train with ``remove_unused_columns=False`` to keep ``task_ids`` / ``group_ids``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from peft import PeftModel
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

from .routing.context import CAPTURED_INPUTS, RoutingContext

WRAPPED_MARK = "__mope_passes_task_ids__"


def pass_task_ids(cls: type) -> bool:
    """Wrap ``cls.forward`` so that ``task_ids`` reaches a MoPE model; True if this call wrapped it."""
    original = cls.__dict__.get("forward")
    if original is None or getattr(original, WRAPPED_MARK, False):
        return False
    if "task_ids" not in inspect.signature(original).parameters:
        return False  # e.g. PeftModel.forward passes every keyword on to the base model itself

    @functools.wraps(original)
    def forward(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        context = getattr(self.base_model, "routing_context", None)
        if task_ids is None or not isinstance(context, RoutingContext):
            return original(self, *args, task_ids=task_ids, **kwargs)
        with context.giving(task_ids=task_ids):
            return original(self, *args, **kwargs)

    setattr(forward, WRAPPED_MARK, True)
    cls.forward = forward
    return True


def peft_task_classes() -> list[type]:
    return sorted({PeftModel, *MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()}, key=lambda c: c.__name__)


def install() -> None:
    """Let ``model(**batch, task_ids=...)`` reach MoPE through every PEFT task class (idempotent)."""
    for cls in peft_task_classes():
        pass_task_ids(cls)


def generate_inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The captured inputs found in a ``generate`` call (its first positional argument is the ids)."""
    found = {
        spec.name: kwargs[spec.name] for spec in CAPTURED_INPUTS if isinstance(kwargs.get(spec.name), torch.Tensor)
    }
    first = args[0] if args else kwargs.get("inputs")
    if isinstance(first, torch.Tensor) and not first.is_floating_point():
        found.setdefault("input_ids", first)
    return found


def generate_with_routing(tuner: Any, *args: Any, **kwargs: Any) -> Any:
    """``tuner.model.generate`` with mope's inputs given to every step and sequence decisions pinned."""
    context: RoutingContext = tuner.routing_context
    given = {spec.name: kwargs.pop(spec.name) for spec in CAPTURED_INPUTS if spec.consumed and spec.name in kwargs}
    found = generate_inputs(args, kwargs)
    if getattr(getattr(tuner.model, "config", None), "is_encoder_decoder", False) and "input_ids" in found:
        # decoding steps get encoder_outputs, not input_ids, yet the decoder's cross-attention k/v layers
        # route encoder tokens: hash routing reads their ids from here
        given["input_ids"] = found["input_ids"]
    with context.giving(**given):
        # steps that do not pass through the model's forward (an encoder-decoder's encoder) see these
        context.begin({**found, **context.given}, collecting=False)
        context.decisions.clear()
        context.decisions.pinned = True
        try:
            return tuner.model.generate(*args, **kwargs)
        finally:
            context.decisions.pinned = False
            context.decisions.clear()
