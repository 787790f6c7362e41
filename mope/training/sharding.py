"""The adapter's tensors whole, under FSDP2 and DeepSpeed ZeRO, for the checks and the bundle at the end of a run.

FSDP2 shards every parameter as a ``DTensor`` (each process holds a slice); DeepSpeed ZeRO-3
partitions them (the parameter itself is empty outside a forward). The loop's weight checks, its
per-rank checksum and the final bundle need the whole values, so they gather them first: only
the tensors PEFT saves (experts, routers, the schedule step, ``modules_to_save``), never the
frozen base, which on a 70B model would not fit on one process. Gathering is a collective: every
process calls :func:`whole_adapter` at the same point, and rank 0 alone writes the bundle.
"""

from __future__ import annotations

import contextlib
import os

import accelerate
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from peft.utils import get_peft_model_state_dict
from torch.distributed.tensor import DTensor

from .recipe import ModelSection, QuantizationSection, RecipeError, TrainingSection

logger = get_logger(__name__)


def check_sharding(
    accelerator: Accelerator, training: TrainingSection, quantization: QuantizationSection | None = None
) -> None:
    """Refuse what the loop cannot do under sharding, and say when accelerate dropped the sharding asked for.

    FSDP1 (``--fsdp_version 1``, accelerate's default) wraps parameters in flat buffers that the
    loop's checks and bundle cannot read without gathering the whole model; it is untested, so
    refused before the model is built. ``accelerate`` 1.16 runs CPU processes
    (``ACCELERATE_USE_CPU=1``) as DDP even under ``--use_fsdp`` / ``--use_deepspeed``: training is
    right, but nothing is sharded, so the run says so instead of pretending. DeepSpeed's engine
    steps the optimizer inside ``backward``, before the loop has seen the step's loss, so
    ``on_nonfinite_loss="skip"`` could not skip anything there. A 4-bit base is sharded by FSDP2
    (stored as floats: :func:`quantized_storage`) and by ZeRO-3; an 8-bit one by neither:
    ``fully_shard`` fails on bitsandbytes' ``Int8Params``, and ``Linear8bitLt`` keeps a whole copy of
    its weights (``weight.CB``, then ``state.CB``) that ZeRO-3 does not partition.
    """
    eight_bits = quantization is not None and quantization.bits == 8
    if eight_bits and accelerator.distributed_type == DistributedType.FSDP:
        raise RecipeError(
            "model.quantization.bits=8 with FSDP: FSDP2 cannot shard bitsandbytes' 8-bit weights (fully_shard fails "
            "on Int8Params). Use bits: 4 (QLoRA; its weights are sharded), or DDP / DeepSpeed ZeRO-2 with 8 bits."
        )
    stage = getattr(accelerator.state.deepspeed_plugin, "zero_stage", None)
    if eight_bits and accelerator.distributed_type == DistributedType.DEEPSPEED and stage == 3:
        raise RecipeError(
            "model.quantization.bits=8 with DeepSpeed ZeRO-3: bitsandbytes' 8-bit layers keep a whole copy of their "
            "weights (Linear8bitLt's weight.CB / state.CB) that ZeRO-3 does not partition, so every process would "
            "hold the whole base. Use bits: 4 (QLoRA; ZeRO-3 partitions it), or DDP / ZeRO-2 with 8 bits."
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and training.on_nonfinite_loss == "skip":
        raise RecipeError(
            "training.on_nonfinite_loss=skip cannot skip an update under DeepSpeed: its engine steps the optimizer "
            "inside backward, before the loop sees the loss. Use training.on_nonfinite_loss=stop (the default) "
            "under DeepSpeed."
        )
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise RecipeError(
            "accelerate launch --use_fsdp: mope's training loop supports FSDP2 only (FSDP1's flat parameters are "
            "untested with MoPE layers); add --fsdp_version 2 (or fsdp_version: 2 in the accelerate config)."
        )
    asked = [flag for flag, env in (("--use_fsdp", "FSDP"), ("--use_deepspeed", "DEEPSPEED")) if use(env)]
    if asked and accelerator.distributed_type == DistributedType.MULTI_CPU:
        logger.warning(
            f"accelerate launch {asked[0]} on CPU processes: accelerate {accelerate.__version__} runs them as DDP "
            "(every process holds the whole model), so this run is not sharded. FSDP and DeepSpeed shard on GPUs; "
            "see docs/training.md, 'Large models'.",
            main_process_only=True,
        )


def quantized_storage(accelerator: Accelerator, model: ModelSection) -> torch.dtype:
    """The dtype a 4-bit base stores its packed weights as (``bnb_4bit_quant_storage``).

    bitsandbytes' default, uint8, except under FSDP2, which shards only floating parameters
    (accelerate leaves uint8 ones whole on every process, and says so). There the bytes are
    stored as the dtype FSDP2 gathers parameters in (the mixed-precision dtype, else
    ``model.dtype``), as PEFT's FSDP-QLoRA guide sets it. DeepSpeed ZeRO-3 partitions uint8 ones
    as they are.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return torch.uint8
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, getattr(torch, model.dtype))


def use(kind: str) -> bool:
    """Whether ``accelerate launch`` asked for ``kind`` (FSDP / DEEPSPEED) through its environment variable."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor PEFT saves for the model's adapters, by state-dict name: the parameters and buffers themselves.

    ``state_dict(keep_vars=True)`` hands out the model's own (possibly sharded) tensors and PEFT's
    own selection picks them, so what is gathered is exactly what a bundle holds.
    """
    state = model.state_dict(keep_vars=True)
    chosen: set[int] = set()
    for name in model.peft_config:
        chosen |= {id(t) for t in get_peft_model_state_dict(model, state_dict=state, adapter_name=name).values()}
    return {name: tensor for name, tensor in state.items() if id(tensor) in chosen}


def whole_adapter(model) -> dict[str, torch.Tensor]:
    """Detached CPU copies of :func:`adapter_tensors`, whole on every process (a collective when sharded)."""
    tensors = adapter_tensors(model)
    partitioned = [t for t in tensors.values() if hasattr(t, "ds_id")]  # DeepSpeed ZeRO-3
    with zero3_gathered(partitioned):
        return {name: full(t).detach().to("cpu", copy=True) for name, t in tensors.items()}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard gathered from every process; any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def zero3_gathered(parameters: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """DeepSpeed's gather of ZeRO-3 partitioned parameters (read-only), or nothing when there are none."""
    if not parameters:
        return contextlib.nullcontext()
    import deepspeed  # only a ZeRO-3 run has partitioned parameters, and it imported deepspeed already

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
