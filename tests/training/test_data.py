"""Training data (mope.training.data): the built-in stdlib tasks are deterministic, labelled and split by hash."""

from __future__ import annotations

import pytest

from mope.training import stdlib_docstrings
from mope.training.data import read_rows
from mope.training.recipe import DataSection


@pytest.mark.parametrize(
    ("source", "labels"),
    [("builtin:stdlib_docstrings", stdlib_docstrings.FAMILIES), ("builtin:stdlib_modules", stdlib_docstrings.MODULES)],
)
def test_builtin_stdlib_tasks_are_deterministic_labelled_and_split(source, labels):
    section = DataSection(source=source)
    train, held_out = read_rows(section)
    assert (train, held_out) == read_rows(section)  # the same rows, in the same order, every time
    for rows in (train, held_out):
        assert {row["label"] for row in rows} == set(labels)
    texts = [row["text"] for row in train + held_out]
    assert len(texts) == len(set(texts))  # no text in both splits or under two labels
    assert 0.1 < len(held_out) / len(texts) < 0.3  # eval_fraction 0.2, by hash
