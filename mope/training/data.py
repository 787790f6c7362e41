"""Examples for a recipe: where they come from, how they are tokenised and batched."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from . import stdlib_docstrings
from .recipe import DataSection, RecipeError

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Examples:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None  # class names for classification, None for language modelling


def synthetic(count: int = 256) -> list[dict[str, Any]]:
    """Tiny offline task for smoke recipes: sentences about two topics."""
    topics = {
        "weather": ["rain", "sun", "cloud", "wind", "storm"],
        "food": ["bread", "soup", "rice", "apple", "cheese"],
    }
    rows = []
    for i in range(count):
        label = "weather" if i % 2 else "food"
        words = topics[label]
        rows.append({"text": " ".join(words[(i + j) % 5] for j in range(6)), "label": label})
    return rows


def split_by_hash(rows: list[dict[str, Any]], fraction: float, key: str) -> tuple[list[dict], list[dict]]:
    train, held_out = [], []
    for row in rows:
        bucket = int(hashlib.sha1(str(row.get(key, row)).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held_out if bucket < fraction else train).append(row)
    return train, held_out


def read_rows(section: DataSection) -> tuple[list[dict], list[dict]]:
    source = section.source
    if source == "builtin:stdlib_docstrings":
        return stdlib_docstrings.build(eval_fraction=section.eval_fraction)
    if source == "builtin:stdlib_modules":
        return stdlib_docstrings.build(eval_fraction=section.eval_fraction, families=stdlib_docstrings.MODULES)
    if source == "builtin:synthetic":
        return split_by_hash(synthetic(), section.eval_fraction, section.text_column)
    import datasets

    extension = os.path.splitext(source)[1].lower()
    if extension in FILE_FORMATS:
        if not os.path.isfile(source):
            raise RecipeError(f"data.source: file {source} does not exist")
        rows = list(datasets.load_dataset(FILE_FORMATS[extension], data_files=source, split="train"))
        return split_by_hash(rows, section.eval_fraction, section.text_column)
    loaded = datasets.load_dataset(source)
    eval_split = next((s for s in ("validation", "test") if s in loaded), None)
    if eval_split is None:
        return split_by_hash(list(loaded["train"]), section.eval_fraction, section.text_column)
    return list(loaded["train"]), list(loaded[eval_split])


def load_examples(section: DataSection, task: str) -> Examples:
    train, held_out = read_rows(section)
    if section.max_examples:
        train = train[: section.max_examples]
    columns = [section.prompt_column, section.response_column] if section.prompt_column else [section.text_column]
    if task == "sequence_classification":
        columns.append(section.label_column)
    for column in columns:
        if train and column not in train[0]:
            raise RecipeError(f"data: column '{column}' not found in {section.source} (has {sorted(train[0])})")
    if task != "sequence_classification":
        return Examples(train, held_out, None)
    labels = sorted({str(row[section.label_column]) for row in train + held_out})
    return Examples(train, held_out, labels)


class Collator:
    """Tokenises rows into padded batches (classification labels or causal-LM labels with -100)."""

    def __init__(self, tokenizer, section: DataSection, task: str, labels: list[str] | None) -> None:
        self.tokenizer, self.section, self.task = tokenizer, section, task
        self.label_ids = {name: i for i, name in enumerate(labels or [])}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        s = self.section
        if self.task == "sequence_classification":
            batch = self.tokenizer(
                [str(r[s.text_column]) for r in rows],
                truncation=True,
                max_length=s.max_length,
                padding=True,
                return_tensors="pt",
            )
            batch["labels"] = torch.tensor([self.label_ids[str(r[s.label_column])] for r in rows])
            return dict(batch)
        return self.causal_batch(rows)

    def causal_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        s, tok = self.section, self.tokenizer
        ids, prompt_lengths = [], []
        for row in rows:
            if s.prompt_column:
                prompt = tok(str(row[s.prompt_column]), add_special_tokens=False)["input_ids"]
                response = tok(str(row[s.response_column]), add_special_tokens=False)["input_ids"]
                ids.append((prompt + response)[: s.max_length])
                prompt_lengths.append(min(len(prompt), s.max_length))
            else:
                ids.append(tok(str(row[s.text_column]), add_special_tokens=False)["input_ids"][: s.max_length])
                prompt_lengths.append(0)
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        for i, n in enumerate(prompt_lengths):
            labels[i, :n] = -100
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
