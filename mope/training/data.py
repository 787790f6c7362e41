"""Examples for a recipe: where they come from, how they are tokenised and batched.

Local data files are read here, not by ``datasets``: a bad file is then a ``RecipeError`` (a
``ValueError``) that names the file and the problem (empty, a header and no rows, malformed at
line N, a missing column), where ``datasets`` raised ``StopIteration`` or a
``DatasetGenerationError`` from deep inside its cache builder. Values stay as the file has them
(a CSV's are strings); text and labels are read with ``str()`` in any case.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import multidomain, stdlib_docstrings
from .recipe import DataSection, RecipeError, is_hub_id

Rows = list[dict[str, Any]]


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


# --- local files: one reader per format, each a list of row dicts or a RecipeError naming the file ---------


def read_text(path: str) -> str:
    """The file's text (UTF-8; a byte-order mark, as spreadsheet programs write, is dropped)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise RecipeError(f"data file {path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None


def json_error(path: str, error: json.JSONDecodeError, line: int | None = None) -> RecipeError:
    where = f"line {line if line is not None else error.lineno}, column {error.colno}"
    return RecipeError(f"data file {path}: malformed JSON at {where}: {error.msg}")


def as_row(path: str, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f"data file {path}: {where} is a JSON {type(value).__name__}, not an object of columns")
    return value


def read_jsonl(path: str, text: str | None = None) -> Rows:
    """JSON Lines: one object per line; blank lines are skipped."""
    rows = []
    # split at "\n" only: str.splitlines would also split at U+2028, which JSON strings may hold unescaped
    for number, line in enumerate((read_text(path) if text is None else text).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(as_row(path, json.loads(line), f"line {number}"))
        except json.JSONDecodeError as error:
            raise json_error(path, error, number) from None
    return rows


def read_json(path: str) -> Rows:
    """A JSON list of row objects, or JSON Lines (``datasets`` reads both from a .json file)."""
    text = read_text(path)
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values: one per line
            return read_jsonl(path, text)
        raise json_error(path, error) from None
    if not isinstance(value, list):  # an object could be one row or columns: datasets guessed one row of lists
        raise RecipeError(
            f"data file {path}: expected a JSON list of row objects (or JSON Lines), got a JSON {type(value).__name__}"
        )
    return [as_row(path, row, f"item {i}") for i, row in enumerate(value)]


def read_csv(path: str) -> Rows:
    """A CSV file with a header line; every row has as many fields as the header."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            return []
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise RecipeError(f"data file {path}: the header names column(s) {duplicated} twice")
        rows = []
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise RecipeError(
                    f"data file {path}: line {reader.line_num} has {len(fields)} field(s), the header "
                    f"has {len(header)} ({', '.join(header)})"
                )
            rows.append(dict(zip(header, fields, strict=True)))
    except csv.Error as error:
        raise RecipeError(f"data file {path}: malformed CSV at line {reader.line_num}: {error}") from None
    if not rows:
        raise RecipeError(f"data file {path} has a header ({', '.join(header)}) but no rows")
    return rows


def read_parquet(path: str) -> Rows:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise RecipeError(f"data file {path} is not a readable Parquet file ({error})") from None


FILE_READERS: dict[str, Callable[[str], Rows]] = {
    ".json": read_json,
    ".jsonl": read_jsonl,
    ".csv": read_csv,
    ".parquet": read_parquet,
}


def multidomain_rows(section: DataSection) -> tuple[Rows, Rows]:
    """The multi-domain union, each row with its domain's index as ``domain_id`` (``data.task_column: domain_id``
    routes by domain; ``domain`` is its name); missing Debian packages are a RecipeError naming them and the command."""
    try:
        splits = multidomain.build(eval_fraction=section.eval_fraction)
    except multidomain.MissingPackages as error:
        raise RecipeError(f"data.source 'builtin:multidomain': {error}") from error
    ids = {domain: index for index, domain in enumerate(multidomain.DOMAINS)}
    train, held_out = ([{**row, "domain_id": ids[row["domain"]]} for row in rows] for rows in splits)
    return train, held_out


# builtin:<name> -> its (train, held_out) rows for a data section
BUILTIN_SOURCES: dict[str, Callable[[DataSection], tuple[Rows, Rows]]] = {
    "builtin:stdlib_docstrings": lambda section: stdlib_docstrings.build(eval_fraction=section.eval_fraction),
    "builtin:stdlib_modules": lambda section: stdlib_docstrings.build(
        eval_fraction=section.eval_fraction, families=stdlib_docstrings.MODULES
    ),
    "builtin:synthetic": lambda section: split_by_hash(synthetic(), section.eval_fraction, section.text_column),
    # the multi-domain study's union (stdlib docstrings, fortunes, man pages); needs Debian packages
    "builtin:multidomain": lambda section: multidomain_rows(section),
}


def source_kind(source: str) -> str:
    """``"builtin"``, ``"file"`` or ``"hub"``; a RecipeError when ``source`` cannot be any of them.

    Checks only what needs no reading: a builtin name, or a local file that exists with a
    supported extension. Anything else must have the shape of a hub dataset name.
    """
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise RecipeError(f"unknown data source '{source}'; choose one of {sorted(BUILTIN_SOURCES)}")
        return "builtin"
    extension = os.path.splitext(source)[1].lower()
    supported = ", ".join(FILE_READERS)
    if os.path.isdir(source):
        raise RecipeError(f"data source '{source}' is a folder; name a {supported} file inside it")
    if os.path.isfile(source):
        if extension not in FILE_READERS:
            raise RecipeError(f"data file {source} has an unsupported extension '{extension}'; use {supported}")
        return "file"
    # a hub dataset is "org/name" (or a bare name without a dot); anything else names a local file
    if extension in FILE_READERS or not is_hub_id(source) or (extension and "/" not in source):
        raise RecipeError(f"data file {source} does not exist")
    return "hub"


def read_file(path: str) -> Rows:
    rows = FILE_READERS[os.path.splitext(path)[1].lower()](path)
    if not rows:
        raise RecipeError(f"data file {path} is empty: it has no rows")
    return rows


def read_hub(source: str) -> tuple[Rows, Rows] | Rows:
    """A datasets hub name: its train split and validation/test split, or its train split alone."""
    import datasets

    try:
        loaded = datasets.load_dataset(source)
    except (OSError, ValueError) as error:  # DatasetNotFoundError, ConnectionError and offline errors are OSErrors
        raise RecipeError(
            f"data source '{source}' is not a local file, and loading it as a datasets hub name failed: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    if "train" not in loaded:
        raise RecipeError(f"dataset '{source}' has no 'train' split (it has {sorted(loaded)})")
    eval_split = next((s for s in ("validation", "test") if s in loaded), None)
    return list(loaded["train"]) if eval_split is None else (list(loaded["train"]), list(loaded[eval_split]))


# values a column may not hold: their repr is no text or label (chat messages belong in a template, token ids
# in input_ids)
Nested = (list, tuple, dict)


def check_columns(rows: Rows, columns: Sequence[str], source: str, texts: Sequence[str] = ()) -> None:
    """Every row has every one of ``columns``, not null and not a list or object (whose repr would be read as
    text), and a non-blank value in each of ``texts``: else a RecipeError naming the column and the first row.

    ``source`` names the data in the message (e.g. ``data file train.jsonl``).
    """
    for column in columns:
        missing = [i for i, row in enumerate(rows, start=1) if row.get(column) is None]
        if missing and len(missing) == len(rows):
            raise RecipeError(f"{source} has no column '{column}' (its columns: {sorted(rows[0])})")
        for problem, bad in (
            ("missing or null", missing),
            ("a list or an object", [i for i, row in enumerate(rows, start=1) if isinstance(row.get(column), Nested)]),
            ("empty", [i for i, row in enumerate(rows, start=1) if column in texts and not str(row[column]).strip()]),
        ):
            if bad:
                raise RecipeError(
                    f"{source}: column '{column}' is {problem} in {len(bad)} of {len(rows)} rows (first: row {bad[0]})"
                )


def read_rows(section: DataSection, columns: Sequence[str] = (), texts: Sequence[str] = ()) -> tuple[Rows, Rows]:
    """``(train, held_out)`` rows of ``section.source``; every row has ``columns``, and ``texts`` not blank
    (:func:`check_columns`). A file's rows are split by a hash of their prompt (or text), so the rows that share
    a prompt fall on the same side."""
    source = section.source
    kind = source_kind(source)
    label = f"data file {source}" if kind == "file" else f"data source '{source}'"
    if kind == "builtin":
        train, held_out = BUILTIN_SOURCES[source](section)
    else:
        loaded = read_file(source) if kind == "file" else read_hub(source)
        if isinstance(loaded, tuple):
            train, held_out = loaded
        else:
            check_columns(loaded, columns, label, texts)  # before the split, so row numbers are the file's
            train, held_out = split_by_hash(loaded, section.eval_fraction, section.prompt_column or section.text_column)
    check_columns(train + held_out, columns, label, texts)
    return train, held_out


def needed_columns(section: DataSection, task: str) -> list[str]:
    """The columns a recipe reads: text (or prompt and response), the label for classification, the id columns."""
    columns = [section.prompt_column, section.response_column] if section.prompt_column else [section.text_column]
    columns += [section.label_column] if task == "sequence_classification" else []
    return columns + [c for c in (section.task_column, section.group_column) if c is not None]


def check_ids(rows: Rows, column: str, bound: int | None, field: str, source: str) -> None:
    """Every value of ``column`` is an integer id in ``[0, bound)`` (a CSV's digits count): a RecipeError naming the
    column, the first bad row and ``field`` (the config field that sets the bound)."""
    for number, row in enumerate(rows, start=1):
        value = row[column]
        digits = isinstance(value, str) and value.strip().isdigit()
        if not (digits or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)):
            raise RecipeError(f"{source}: column '{column}' holds {value!r} in row {number}; ids are integers >= 0")
        if bound is not None and int(value) >= bound:
            raise RecipeError(
                f"{source}: column '{column}' holds id {int(value)} in row {number}, but {field}={bound} (ids lie "
                f"in [0, {bound}))"
            )


def id_bounds(section: DataSection, config: Any) -> dict[str, tuple[int, str]]:
    """Each id column -> (the count its ids lie below, the field of the adapter ``config`` that sets it)."""
    columns = ((section.task_column, "num_tasks"), (section.group_column, "num_groups"))
    return {
        column: (getattr(config, field), f"adapter.config.{field}")
        for column, field in columns
        if column is not None and getattr(config, field, None) is not None
    }


def load_examples(section: DataSection, task: str, id_bounds: dict[str, tuple[int, str]] | None = None) -> Examples:
    """The recipe's train and held-out rows; ``id_bounds`` (:func:`id_bounds`) bounds its id columns."""
    # a causal LM's text (or response) is what it learns: a blank one leaves a row without label tokens
    texts = [] if task == "sequence_classification" else [section.response_column or section.text_column]
    train, held_out = read_rows(section, needed_columns(section, task), texts)
    for column in (section.task_column, section.group_column):
        if column is not None:
            bound, field = (id_bounds or {}).get(column, (None, ""))
            check_ids(train + held_out, column, bound, field, f"data source {section.source}")
    for empty, split, other, advice in ((train, "held-out", held_out, "lower"), (held_out, "train", train, "raise")):
        if not empty:
            raise RecipeError(
                f"data source {section.source}: all {len(other)} rows fell in the {split} split "
                f"(data.eval_fraction={section.eval_fraction}); add rows or {advice} eval_fraction"
            )
    if section.max_examples:
        train = train[: section.max_examples]
    if task != "sequence_classification":
        return Examples(train, held_out, None)
    labels = sorted({str(row[section.label_column]) for row in train + held_out})
    return Examples(train, held_out, labels)


def prompt_to_keep(prompt: list[int], response_length: int, max_length: int) -> list[int]:
    """The end of a prompt too long to leave its response room: at most ``max_length // 2`` tokens once they do not
    fit together (as TRL's DPO keeps the prompt's end), so the response keeps the rest. A prompt that filled
    ``max_length`` left no label token, and a batch of such rows had a NaN loss (the run stopped as diverged)."""
    if len(prompt) + response_length <= max_length:
        return prompt
    keep = min(len(prompt), max(max_length - response_length, max_length // 2))
    return prompt[len(prompt) - keep :]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """What a causal LM's example starts and ends with: the tokens the tokenizer puts before a text (Llama's BOS,
    BERT's [CLS], none for GPT-2) and its EOS (none where it has no EOS token), so the model learns to stop."""
    full, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    eos = tokenizer.eos_token_id
    return full[:start], [] if eos is None else [eos]


class Collator:
    """Tokenises rows into padded batches (classification labels or causal-LM labels with -100).

    A causal LM's example is ``prefix + prompt + response + EOS`` (or ``prefix + text + EOS``), cut to
    ``max_length``, as TRL's SFTTrainer builds it; only the response (or the text) and the EOS carry labels.
    """

    def __init__(self, tokenizer, section: DataSection, task: str, labels: list[str] | None) -> None:
        self.tokenizer, self.section, self.task = tokenizer, section, task
        self.label_ids = {name: i for i, name in enumerate(labels or [])}
        self.prefix, self.eos = special_tokens(tokenizer) if task != "sequence_classification" else ([], [])
        if task != "sequence_classification" and section.max_length < len(self.prefix) + 2:
            raise RecipeError(
                f"data.max_length={section.max_length} leaves a causal LM no label token: the tokenizer starts "
                f"each example with {len(self.prefix)} special token(s); use at least {len(self.prefix) + 2}"
            )

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
            batch = dict(batch)
        else:
            batch = self.causal_batch(rows)
        for column, key in ((s.task_column, "mope_task_ids"), (s.group_column, "group_ids")):
            if column is not None:  # checked when loaded (check_ids)
                batch[key] = torch.tensor([int(r[column]) for r in rows])
        return batch

    def tokens(self, text: Any, end: list[int] | None = None) -> list[int]:
        """``text``'s tokens, then ``end`` unless they already end with it (a text that holds its EOS)."""
        ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        return ids if not end or ids[-len(end) :] == end else ids + end

    def causal_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        s, budget = self.section, self.section.max_length - len(self.prefix)
        ids, prompt_lengths = [], []
        for row in rows:
            if s.prompt_column:
                response = self.tokens(row[s.response_column], self.eos)
                prompt = prompt_to_keep(self.tokens(row[s.prompt_column]), len(response), budget)
            else:
                prompt, response = [], self.tokens(row[s.text_column], self.eos)
            ids.append((self.prefix + prompt + response)[: s.max_length])
            prompt_lengths.append(len(self.prefix) + len(prompt))
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        for i, n in enumerate(prompt_lengths):
            labels[i, :n] = -100
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
