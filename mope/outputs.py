"""The model output's ``aux_loss``: how MoPE's router losses reach the loss a trainer optimises.

The tuner's forward hook calls :func:`attach_aux_loss` on the wrapped model's output: ``aux_loss`` on the
output (a ``ModelOutput`` type gets a subclass with that field, :func:`with_aux_loss_field`), added to
``loss`` when there is one, weighted by the micro-batch's token share under ``Trainer``'s accumulation
(:func:`accumulation_share`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput


def accumulation_share(kwargs: dict) -> torch.Tensor | None:
    """This micro-batch's share of the label tokens ``num_items_in_batch`` counts, where ``Trainer`` passes it.

    With ``num_items_in_batch`` a causal LM's loss is its tokens' summed loss over the accumulated batch's
    token count (all processes' under ``average_tokens_across_devices``), and the Trainer neither divides it
    by the accumulation steps nor lets DDP's mean undo its world-size factor. The aux loss, a mean per
    micro-batch, joins it weighted by this share, so that a step's router loss is its micro-batches'
    token-weighted mean, as one unaccumulated batch would give (TRL's MoE rule, by tokens). Labels are
    counted as the loss does: ``shift_labels``, else ``labels[..., 1:]``.
    """
    total, labels = kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
    if labels is None and isinstance(kwargs.get("labels"), torch.Tensor):
        labels = kwargs["labels"][..., 1:]
    if total is None or not isinstance(labels, torch.Tensor):
        return None
    return labels.ne(-100).sum() / torch.as_tensor(total, device=labels.device).clamp_min(1)


def attach_aux_loss(output: Any, aux: torch.Tensor, model: nn.Module, share: torch.Tensor | None = None) -> Any:
    """Put ``aux`` on a model output as ``aux_loss`` and add it to ``loss`` when there is one.

    ``share`` (:func:`accumulation_share`) weighs the aux added to ``loss``; ``aux_loss`` stays unweighted.

    A model that has an ``aux_loss`` of its own (e.g. Mixtral) gets the sum. A tuple output
    (``return_dict=False``) has no place for ``aux_loss``: when it starts with a loss (transformers puts
    the loss first when labels are given) ``aux`` is added to that loss; a transformers model's tuple
    without a loss is refused, as the aux loss would be silently lost.
    """
    joined = aux if share is None else aux * share.to(aux.device)
    if isinstance(output, tuple) and output and is_loss(output[0]):
        return (output[0] + joined.to(output[0].device), *output[1:])
    if isinstance(output, tuple) and isinstance(model, PreTrainedModel):
        raise ValueError(
            f"{type(model).__name__} returned a tuple without a loss (return_dict=False and no labels) in training, "
            "so MoPE's router losses (aux_loss: load balancing, z-loss) would be lost. Call it with return_dict=True "
            "and add output.aux_loss to your loss, or pass labels: the loss it returns then includes them."
        )
    if not isinstance(output, dict):  # ModelOutput is an OrderedDict
        return output
    if isinstance(output, ModelOutput) and "aux_loss" not in output.__dataclass_fields__:
        made = WITH_AUX_LOSS.get(type(output))
        if made is None and not torch.compiler.is_compiling():  # dynamo cannot trace making a class
            made = with_aux_loss_field(type(output))
        if made is not None:  # else (compiled, type not declared by forward) the item alone, as a plain dict
            output = made(**output)
    previous = output.get("aux_loss")
    output["aux_loss"] = aux if previous is None else previous + aux.to(previous.device)
    if output.get("loss") is not None:
        output["loss"] = output["loss"] + joined.to(output["loss"].device)
    return output


# output type -> its subclass with an aux_loss field: made for the types a model's forward declares when
# MoPE is injected (so a compiled first forward finds them), else on the first eager training forward
WITH_AUX_LOSS: dict[type, type] = {}


def declared_outputs(model: nn.Module) -> list[type]:
    """The ``ModelOutput`` types without ``aux_loss`` in ``model.forward``'s return annotation (``tuple | ...Output``)."""
    try:
        returned = typing.get_type_hints(type(model).forward).get("return")
    except (NameError, TypeError, AttributeError):  # an annotation that does not evaluate: nothing declared
        return []
    types = [t for t in typing.get_args(returned) or (returned,) if isinstance(t, type) and issubclass(t, ModelOutput)]
    return [t for t in types if "aux_loss" not in t.__dataclass_fields__]


def with_aux_loss_field(output_type: type) -> type:
    """``output_type`` (a ``ModelOutput`` without ``aux_loss``) with that field: a subclass, so isinstance holds.

    torch's pytree rebuilds a ``ModelOutput`` as ``type(**items)``, and DDP does so with every output when
    it looks for unused parameters (as ``Trainer`` asks for a ``PeftModel``): an ``aux_loss`` item that is
    not a field of the type failed there (``unexpected keyword argument 'aux_loss'``).
    """
    made = WITH_AUX_LOSS.get(output_type)
    if made is None:
        field = ("aux_loss", "torch.FloatTensor | None", dataclasses.field(default=None))
        name = f"{output_type.__name__}WithAuxLoss"
        made = dataclasses.make_dataclass(name, [field], bases=(output_type,), namespace={"__module__": __name__})
        WITH_AUX_LOSS[output_type] = made
    return made


def is_loss(value: Any) -> bool:
    """A 0-dim tensor: what a loss is, and what no other model output (logits, hidden states, caches) is."""
    return isinstance(value, torch.Tensor) and value.dim() == 0
