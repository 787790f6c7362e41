"""A base model with a bundle on it, and texts to run through it: what ``mope stats`` / ``collapse`` need.

The model class follows the bundle's ``task_type`` (a classification bundle carries its head,
so the head's size is read from the bundle's header); the base is a local folder or
``package:<name>`` as in recipes (:func:`mope.training.models.resolve_location`). Data files are
read as recipes read them (:func:`mope.training.data.read_rows`): all rows, the recipe's train
split first, then its held-out split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import AutoModel

from ..api import load_mope
from ..bundles import read_bundle_header
from ..bundles.info import read_config
from ..training.data import read_rows
from ..training.models import AUTO_CLASSES, MODEL_CONFIG, TASK_TYPES, check_location, tokenizer_at
from ..training.recipe import DataSection, RecipeError

# PEFT task type -> transformers Auto class (others, e.g. feature extraction, get AutoModel).
AUTO_BY_TASK_TYPE = {TASK_TYPES[task]: auto for task, auto in AUTO_CLASSES.items()}


def head_size(bundle: str, config: dict) -> dict[str, int]:
    """``num_labels`` of a classification bundle, from its saved head's weight (``[num_labels, hidden]``)."""
    if config.get("task_type") != "SEQ_CLS":
        return {}
    heads = tuple(f"{name}.weight" for name in config.get("modules_to_save") or ())
    for name, shape in read_bundle_header(bundle).items():
        if name.endswith(heads) and len(shape) == 2:
            return {"num_labels": shape[0]}
    return {}


def load_model(bundle: str | os.PathLike, base: str, device: str | None = None) -> PeftModel:
    """``base`` (folder or ``package:<name>``) with the MoPE bundle loaded, in eval mode."""
    bundle = os.fspath(bundle)
    config = read_config(bundle)
    location = check_location(base, "--base", MODEL_CONFIG)
    auto = AUTO_BY_TASK_TYPE.get(config.get("task_type"), AutoModel)
    try:
        base_model = auto.from_pretrained(location, **head_size(bundle, config))
    except OSError as error:
        where = "a local folder" if os.path.isdir(location) else "not a local folder"
        raise ValueError(f"cannot load base model '{base}' ({where}): {str(error).splitlines()[0]}") from error
    model = load_mope(base_model, bundle)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def load_tokenizer(location: str, option: str = "--tokenizer"):
    """The tokenizer in ``location`` (folder or ``package:<name>``), with a pad token, as recipes load it."""
    check_location(location, option)
    try:
        return tokenizer_at(location, option)
    except RecipeError as error:
        raise RecipeError(f"{error}; pass --tokenizer" if option == "--base" else str(error)) from error


def read_texts(source: str, text_column: str = "text", max_examples: int | None = None) -> list[str]:
    """The ``text_column`` of every row of a .json/.jsonl/.csv/.parquet file (or a ``builtin:`` source)."""
    train, held_out = read_rows(DataSection(source=source, text_column=text_column), [text_column])
    texts = [str(row[text_column]) for row in train + held_out]
    return texts[:max_examples] if max_examples else texts


def text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device) -> Iterator[dict]:
    """Padded, truncated batches of ``input_ids`` and ``attention_mask`` on ``device``."""
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        yield {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
