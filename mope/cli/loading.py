"""A base model with a bundle on it, and texts to run through it: what ``mope stats`` / ``collapse`` need.

The model class follows the bundle's ``task_type`` (a classification bundle carries its head,
so the head's size is read from the bundle's header); the base is a local folder or
``package:<name>`` as in recipes (:func:`mope.training.models.resolve_location`); one that does not
load (a truncated weights file, a config.json that is not JSON or names no model, weights of other
sizes than it says) is a ValueError naming it. Data files are read and checked by the recipe
readers, every row in the file's order (``--max-examples N``: its first N rows); a ``builtin:`` or
hub source gives its train split, then its held-out split.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch
from huggingface_hub.errors import StrictDataclassError
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForTokenClassification,
)

from ..api import load_mope
from ..bundles import read_bundle_header
from ..bundles.info import read_config
from ..config import MoPEConfig
from ..training.data import check_columns, read_file, read_rows, source_kind
from ..training.models import AUTO_CLASSES, MODEL_CONFIG, TASK_TYPES, check_location, first_line, tokenizer_at
from ..training.recipe import DataSection, RecipeError

# PEFT task type -> transformers Auto class (others, e.g. feature extraction, get AutoModel).
AUTO_BY_TASK_TYPE = {
    **{TASK_TYPES[task]: auto for task, auto in AUTO_CLASSES.items()},
    "TOKEN_CLS": AutoModelForTokenClassification,  # bundles trained outside a recipe: their keys hold the head's
    "QUESTION_ANS": AutoModelForQuestionAnswering,  # model (e.g. 'bert.'), so AutoModel's had no place for them
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
}
# The task types whose saved head gives num_labels (its output weight's first dimension).
LABELLED_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")


def head_size(bundle: str) -> dict[str, int]:
    """``num_labels`` of a classification bundle, from its saved head's output weight (``[num_labels, hidden]``):
    ``<head>.weight``, or ``<head>.out_proj.weight`` for the nested heads of RoBERTa, XLM-R and ELECTRA."""
    config = MoPEConfig.from_pretrained(bundle)  # validated: modules_to_save is a list of names
    if str(getattr(config.task_type, "value", config.task_type)) not in LABELLED_TASK_TYPES:
        return {}
    heads = tuple(f".{name}{part}.weight" for name in config.modules_to_save or () for part in ("", ".out_proj"))
    for name, shape in read_bundle_header(bundle).items():
        if f".{name}".endswith(heads) and len(shape) == 2:
            return {"num_labels": shape[0]}
    return {}


def load_model(bundle: str | os.PathLike, base: str, device: str | None = None) -> PeftModel:
    """``base`` (folder or ``package:<name>``) with the MoPE bundle loaded, in eval mode."""
    bundle = os.fspath(bundle)
    config = read_config(bundle)
    location = check_location(base, "--base", MODEL_CONFIG)
    auto = AUTO_BY_TASK_TYPE.get(config.get("task_type"), AutoModel)
    try:
        base_model = auto.from_pretrained(location, **head_size(bundle))
    except (OSError, SafetensorError, ValueError, StrictDataclassError) as error:
        raise base_load_error(base, location, error) from error
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):  # transformers' load report: sizes other than config.json's
            raise  # anything else is a bug, not a mistake in the folder
        raise base_load_error(base, location, error) from error
    model = load_mope(base_model, bundle)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def base_load_error(base: str, location: str, error: Exception) -> ValueError:
    """Why ``from_pretrained`` could not load the base, in one line naming ``--base`` and the broken file.

    OSError: no weights, or a config.json that is not JSON; SafetensorError: a truncated or foreign
    weights file; ValueError: a config.json that names no model transformers knows;
    StrictDataclassError: config values that do not fit together; RuntimeError (only transformers' load
    report, see :func:`load_model`): weights of other sizes than config.json says.
    """
    if isinstance(error, RuntimeError):
        detail = f"its weights have other sizes than its {MODEL_CONFIG} says"
    elif isinstance(error, SafetensorError):
        broken = unreadable_weights(location)
        detail = f"weights file '{broken or location}' is truncated or not safetensors ({first_line(error)})"
    elif isinstance(error, StrictDataclassError):
        detail = f"{MODEL_CONFIG}: {' '.join(str(error).split())}"
    else:
        detail = first_line(error)
    where = "a local folder" if os.path.isdir(location) else "not a local folder"
    return ValueError(f"--base: cannot load base model '{base}' ({where}): {detail}")


def unreadable_weights(folder: str) -> str | None:
    """The first ``*.safetensors`` file in ``folder`` whose header does not read (truncated, not safetensors)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors"))):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return None


def load_tokenizer(location: str, option: str = "--tokenizer"):
    """The tokenizer in ``location`` (folder or ``package:<name>``), with a pad token, as recipes load it."""
    check_location(location, option)
    try:
        return tokenizer_at(location, option)
    except RecipeError as error:
        raise RecipeError(f"{error}; pass --tokenizer" if option == "--base" else str(error)) from error


def read_texts(source: str, text_column: str = "text", max_examples: int | None = None) -> list[str]:
    """The ``text_column`` of every row of a .json/.jsonl/.csv/.parquet file, in the file's order.

    A ``builtin:`` or hub source has no file order: its train split comes first, then its held-out
    split (:func:`mope.training.data.read_rows`). Checked as recipes check data (RecipeError): token ids or
    messages (a list or an object, whose repr was analysed) are refused.
    """
    if source_kind(source) == "file":  # not read_rows: its hash split would reorder the rows
        rows = read_file(source)
        check_columns(rows, [text_column], f"data file {source}")
    else:
        train, held_out = read_rows(DataSection(source=source, text_column=text_column), [text_column])
        rows = train + held_out
    texts = [str(row[text_column]) for row in rows]
    return texts[:max_examples] if max_examples else texts


def text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device) -> Iterator[dict]:
    """Padded, truncated batches of ``input_ids`` and ``attention_mask`` on ``device``."""
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(  # padded on the right whatever the tokenizer's side: positions count from the first token
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        yield {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
