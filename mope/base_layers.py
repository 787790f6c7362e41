"""Base-layer dispatch: what mope needs to know about each type of frozen layer that experts wrap.

A MoPE layer runs its frozen base module as a black box in the forward pass; only a few questions
look inside it: its in/out features, and, to fold experts into it (``merge_and_unload``), its
weight as a dense ``[out, in]`` matrix and how to write a folded one back. The answers differ by
type: GPT-2's ``Conv1D`` stores its weight transposed; bitsandbytes' ``Linear4bit`` packs it into
uint8 blocks with a quantization state (nf4 or fp4, optionally double-quantized) and
``Linear8bitLt`` into int8 rows with a scale per row. Reading dequantizes and writing quantizes
again (as PEFT's LoRA does in ``peft/tuners/lora/bnb.py``).

Each type is one :class:`BaseLayerType`, found by a small dispatch function; the functions in
:data:`BASE_LAYER_DISPATCH` are tried in order (the bitsandbytes layers subclass ``nn.Linear``, so
they come first) and the first that answers wins, as PEFT's LoRA tries ``dispatch_bnb_4bit``,
``dispatch_bnb_8bit``, ..., ``dispatch_default``. A new type is one function and one entry; the
layer and the injection code do not change. bitsandbytes is never imported here: a layer can only
be one of its types if the program already imported it.

Quantized layers of the other libraries PEFT's LoRA knows (GPTQ, AWQ, HQQ, EETQ, AQLM, torchao,
optimum-quanto, ...) are not supported: :func:`check_base_layer` names the library, the type and
the module, and the tuner raises it before the adapter is attached anywhere.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import _get_in_out_features
from torch import nn
from transformers.pytorch_utils import Conv1D

# Weight dtypes of an unquantized layer; an nn.Linear subclass holding anything else is a quantized
# layer of a library mope does not know (reading it as a dense matrix would ignore its scales).
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Quantized layers PEFT's LoRA wraps that mope does not: the package defining the layer's class (or its
# weight's tensor type) -> the name users know. Matched by module path, so none of them is imported.
UNSUPPORTED_QUANTIZERS: dict[str, str] = {
    "auto_gptq": "GPTQ (auto-gptq)",
    "gptqmodel": "GPTQ/AWQ (GPTQModel)",
    "awq": "AWQ (AutoAWQ)",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "torchao": "torchao",
    "optimum.quanto": "optimum-quanto",
    "neural_compressor": "Intel Neural Compressor",
    "transformer_engine": "Transformer Engine",
}


@dataclass(frozen=True)
class BaseLayerType:
    """How mope reads one type of frozen base layer and writes experts folded into it.

    ``read_weight`` returns the dense weight in ``nn.Linear`` layout ``[out, in]`` (a new tensor for
    quantized types, the stored one otherwise); ``write_weight`` stores such a weight back.
    Quantized types re-quantize on writing, which rounds; for them ``keep`` captures the packed
    weight before the first fold and ``restore`` puts it back, so unfolding is exact instead of
    subtracting the experts from a rounded weight.
    """

    name: str
    features: Callable[[nn.Module], tuple[int, int]]
    read_weight: Callable[[nn.Module], torch.Tensor]
    write_weight: Callable[[nn.Module, torch.Tensor], None]
    transposed: bool = False  # stored [in, out] (Conv1D): export writes the LoRA with fan_in_fan_out
    keep: Callable[[nn.Module], Any] | None = None
    restore: Callable[[nn.Module, Any], None] | None = None


def declared_features(module: nn.Module) -> tuple[int, int]:
    """Quantized layers declare their shape; their packed weight's shape is not it."""
    return module.in_features, module.out_features


# --- nn.Linear and Conv1D ---------------------------------------------------------------------------------


def keep_stored(module: nn.Module) -> torch.Tensor:
    """A copy of a dense weight, for a fold that subtracting cannot undo (an (IA)^3 scale of 0)."""
    return module.weight.data.clone()


def restore_stored(module: nn.Module, kept: torch.Tensor) -> None:
    module.weight.data.copy_(kept)


def read_stored(module: nn.Module) -> torch.Tensor:
    return module.weight.data


def write_stored(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.data.copy_(weight)


def read_stored_transposed(module: nn.Module) -> torch.Tensor:
    return module.weight.data.T


def write_stored_transposed(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.data.copy_(weight.T)


LINEAR = BaseLayerType("nn.Linear", _get_in_out_features, read_stored, write_stored)
CONV1D = BaseLayerType("Conv1D", _get_in_out_features, read_stored_transposed, write_stored_transposed, transposed=True)


def dispatch_linear(module: nn.Module) -> BaseLayerType | None:
    dense = isinstance(module, nn.Linear) and module.weight.dtype in DENSE_DTYPES
    return LINEAR if dense else None


def dispatch_conv1d(module: nn.Module) -> BaseLayerType | None:
    return CONV1D if isinstance(module, Conv1D) else None


# --- bitsandbytes ----------------------------------------------------------------------------------------


def bitsandbytes_dispatch(class_name: str, found: BaseLayerType) -> Callable[[nn.Module], BaseLayerType | None]:
    """The dispatch function for ``bitsandbytes.nn.<class_name>`` (never matches if bitsandbytes was never imported)."""

    def dispatch(module: nn.Module) -> BaseLayerType | None:
        bnb = sys.modules.get("bitsandbytes")
        return found if bnb is not None and isinstance(module, getattr(bnb.nn, class_name)) else None

    dispatch.__name__ = dispatch.__qualname__ = f"dispatch_bnb_{class_name}"
    return dispatch


def read_bnb_4bit(module: nn.Module) -> torch.Tensor:
    """The dequantized weight. An inference forward on a CPU with AVX512-BF16 repacks the codes for bitsandbytes'
    CPU kernel (``quant_state.packing_format_for_cpu``) and keeps the block scales transposed, in bf16; reading
    that as the standard layout was 0.13 off where the largest entry is 0.07. It is put back first, as
    bitsandbytes does before saving, whose inverse leaves the scales transposed where they were not double
    quantized (a weight with more than one block per row read 0.03 off): they are put back here too."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit

    # on copies: the inverse rewrites the state in place and re-quantizes double-quantized scales (lossy), and the
    # layer keeps serving (and unmerge restores) its own codes
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(weight.quant_state))
    if state.absmax.dim() == 2:  # [blocks per row, rows]: the CPU layout's
        state.absmax = state.absmax.T.reshape(-1).float()
    return dequantize_4bit(data, state)


def write_bnb_4bit(module: nn.Module, weight: torch.Tensor) -> None:
    """A new ``Params4bit`` with the old one's settings (blocksize, nf4/fp4, double quant), quantized from ``weight``."""
    bnb = sys.modules["bitsandbytes"]
    old = module.weight
    settings = {key: value for key, value in vars(old).items() if not key.startswith("_") and key != "data"}
    settings.update(bnb_quantized=False, requires_grad=False, quant_state=None)
    module.weight = bnb.nn.Params4bit(weight.to("cpu"), **settings).to(old.device)  # .to quantizes


def keep_bnb_4bit(module: nn.Module) -> nn.Parameter:
    return module.weight  # packed data and quant_state; write_bnb_4bit replaces it, never changes it


def restore_bnb_4bit(module: nn.Module, kept: nn.Parameter) -> None:
    module.weight = kept


BNB_4BIT = BaseLayerType(
    "bitsandbytes Linear4bit", declared_features, read_bnb_4bit, write_bnb_4bit, False, keep_bnb_4bit, restore_bnb_4bit
)
dispatch_bnb_4bit = bitsandbytes_dispatch("Linear4bit", BNB_4BIT)


def int8_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 rows and their scales; the first forward moves them from the weight to ``module.state``."""
    weight, state = module.weight, module.state
    if state.SCB is not None:
        return weight.data, state.SCB
    return weight.data, weight.SCB


def read_bnb_8bit(module: nn.Module) -> torch.Tensor:
    bnb = sys.modules["bitsandbytes"]
    if module.weight.dtype != torch.int8:  # has_fp16_weights=True keeps a dense weight until it is moved
        return module.weight.data
    codes, scales = int8_codes(module)
    return bnb.functional.int8_vectorwise_dequant(codes, scales.to(codes.device))


def write_bnb_8bit(module: nn.Module, weight: torch.Tensor) -> None:
    bnb = sys.modules["bitsandbytes"]
    old = module.weight
    new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
    module.weight = new.to(old.device)  # .to quantizes
    module.state.reset_grads()  # the next forward takes the new rows and scales from the weight


def keep_bnb_8bit(module: nn.Module) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
    return (module.weight, *int8_codes(module))


def restore_bnb_8bit(module: nn.Module, kept: tuple[nn.Parameter, torch.Tensor, torch.Tensor]) -> None:
    weight, codes, scales = kept
    weight.CB, weight.SCB = codes, scales  # where a fresh Int8Params holds them; the next forward moves them
    module.weight = weight
    module.state.reset_grads()


BNB_8BIT = BaseLayerType(
    "bitsandbytes Linear8bitLt",
    declared_features,
    read_bnb_8bit,
    write_bnb_8bit,
    False,
    keep_bnb_8bit,
    restore_bnb_8bit,
)
dispatch_bnb_8bit = bitsandbytes_dispatch("Linear8bitLt", BNB_8BIT)


# --- the table ---------------------------------------------------------------------------------------------

# Tried in order; subclasses before their base classes.
BASE_LAYER_DISPATCH: tuple[Callable[[nn.Module], BaseLayerType | None], ...] = (
    dispatch_bnb_4bit,
    dispatch_bnb_8bit,
    dispatch_conv1d,
    dispatch_linear,
)
SUPPORTED_NAMES = "nn.Linear, Conv1D, bitsandbytes Linear4bit / Linear8bitLt"


def base_layer_type(module: nn.Module) -> BaseLayerType | None:
    """The type of ``module`` as a base layer experts can wrap, or None."""
    if quantizer_of(module) is not None:
        return None
    return next((found for dispatch in BASE_LAYER_DISPATCH if (found := dispatch(module)) is not None), None)


def supported_base_layer(module: nn.Module) -> bool:
    return base_layer_type(module) is not None


def quantizer_of(module: nn.Module) -> str | None:
    """The unsupported quantization library that defines ``module``'s class or its weight's type, or None."""
    weight = getattr(module, "weight", None)
    classes = [*type(module).__mro__, *(type(weight).__mro__ if isinstance(weight, torch.Tensor) else ())]
    for cls in classes:
        for package, name in UNSUPPORTED_QUANTIZERS.items():
            if cls.__module__ == package or cls.__module__.startswith(package + "."):
                return name
    return None


def check_base_layer(module: nn.Module, module_name: str) -> BaseLayerType:
    """``module``'s base-layer type; a ValueError naming the module, its type and the fix otherwise."""
    found = base_layer_type(module)
    if found is not None:
        return found
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    quantizer = quantizer_of(module)
    if quantizer is not None:
        raise ValueError(
            f"Module '{module_name}' is a {quantizer} quantized layer ({kind}), which mope cannot wrap: it wraps "
            f"{SUPPORTED_NAMES}. Quantize the base model with bitsandbytes instead (transformers.BitsAndBytesConfig, "
            "4-bit or 8-bit), or leave this module out of target_modules."
        )
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor):
        raise ValueError(
            f"Module '{module_name}' is a {kind} whose weight is {weight.dtype}: a quantized layer type mope does "
            f"not know. MoPE experts wrap {SUPPORTED_NAMES}; quantize with bitsandbytes, or leave this module out "
            "of target_modules."
        )
    raise ValueError(
        f"Module '{module_name}' is a {type(module).__name__}; MoPE experts attach to {SUPPORTED_NAMES} (or, as "
        "whole-FFN experts, to a gated MLP block: mope.ffn_layer) only. Adjust target_modules."
    )
