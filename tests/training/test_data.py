"""Training data (mope.training.data): the built-in stdlib tasks are deterministic, labelled and split by hash;
causal-LM examples are built as TRL builds them."""

from __future__ import annotations

import pytest
from conftest import word_tokenizer

from mope.training import stdlib_docstrings
from mope.training.data import Collator, read_rows
from mope.training.recipe import DataSection, RecipeError


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


def bos_word_tokenizer():
    """The tests' word tokenizer, with a BOS (t2) that it puts before every text, as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = word_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="t2 $A", special_tokens=[("t2", 2)])
    tokenizer.bos_token = "t2"
    return tokenizer


def test_a_causal_example_starts_as_the_tokenizer_starts_a_text_and_ends_with_eos():
    # examples had no EOS (a model fine-tuned by mope.train never learned to stop) and no BOS
    pairs = DataSection(source="x.jsonl", prompt_column="prompt", response_column="response", max_length=8)
    rows = [{"prompt": "t10 t11", "response": "t12"}, {"prompt": "t13", "response": "t14 t15 t1"}]
    for tokenizer, start in ((word_tokenizer(), []), (bos_word_tokenizer(), [2])):
        batch = Collator(tokenizer, pairs, "causal_lm", None)(rows)
        width = len(start) + 4
        assert batch["input_ids"].tolist() == [[*start, 10, 11, 12, 1], [*start, 13, 14, 15, 1]]  # EOS once
        assert batch["labels"].tolist() == [[-100] * (width - 2) + [12, 1], [-100] * (width - 3) + [14, 15, 1]]
    text = DataSection(source="x.jsonl", max_length=4)
    batch = Collator(bos_word_tokenizer(), text, "causal_lm", None)([{"text": "t10 t11 t12 t13"}, {"text": "t10"}])
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12], [2, 10, 1, 0]]  # cut: no EOS; padded with t0
    assert batch["labels"].tolist() == [[-100, 10, 11, 12], [-100, 10, 1, -100]]
    with pytest.raises(RecipeError, match=r"data.max_length=2 leaves a causal LM no label token.*at least 3"):
        Collator(bos_word_tokenizer(), DataSection(source="x.jsonl", max_length=2), "causal_lm", None)


def test_a_family_whose_packages_this_python_lacks_is_refused():
    # Debian ships tkinter and idlelib apart: the task silently lost two classes (the H100 study ran 8-way)
    families = {"gui": ("no_such_package_here",), "xml": ("xml",)}
    with pytest.raises(
        ValueError, match=r"no docstrings for label\(s\) \['gui'\] \(packages \['no_such_package_here'\]\)"
    ):
        stdlib_docstrings.build(families=families)
