"""Data files and recipes that cannot be used (issue 16, "The CLI and data files"): each is a ValueError
(RecipeError) that names the file or field and the problem, from every reader (json, jsonl, csv, parquet,
builtin:), from recipe YAML (duplicate keys at any depth) and from checked_recipe before a launch.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from mope.training.data import id_bounds, load_examples, read_rows
from mope.training.launch import checked_recipe
from mope.training.models import adapter_config, build_model, load_tokenizer
from mope.training.recipe import DataSection, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"

ROWS = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(6)]


def write_parquet(path: Path, rows: list[dict]) -> None:
    table = pyarrow.Table.from_pylist(rows) if rows else pyarrow.table({"text": pyarrow.array([], pyarrow.string())})
    pyarrow.parquet.write_table(table, path)


# file name -> (content: text, bytes, or a list of rows for parquet, words the error must hold)
BAD_FILES = {
    "empty.jsonl": ("", ["empty.jsonl", "is empty", "no rows"]),
    "blank.jsonl": ("\n\n", ["blank.jsonl", "is empty"]),
    "empty.json": ("", ["empty.json", "is empty"]),
    "list.json": ("[]", ["list.json", "is empty"]),
    "empty.csv": ("", ["empty.csv", "is empty"]),
    "header.csv": ("text,label\n", ["header.csv", "header (text, label) but no rows"]),
    "short.csv": ("text,label\na,b\nc\n", ["short.csv", "line 3 has 1 field(s), the header has 2"]),
    "twice.csv": ("text,text\na,b\n", ["twice.csv", "['text'] twice"]),
    "broken.jsonl": ('{"text": "a"}\n{"text": \n', ["broken.jsonl", "malformed JSON at line 2, column 10"]),
    "list-line.jsonl": ('{"text": "a"}\n[1]\n', ["list-line.jsonl", "line 2 is a JSON list, not an object"]),
    "broken.json": ('[{"text": "a"},\n {"text": ', ["broken.json", "malformed JSON at line 2"]),
    "number.json": ("5", ["number.json", "got a JSON int"]),
    "columns.json": (
        '{"text": ["a", "b"]}',
        ["columns.json", "expected a JSON list of row objects", "got a JSON dict"],
    ),
    "latin1.jsonl": (b'{"text": "caf\xe9"}\n', ["latin1.jsonl", "not UTF-8", "byte 13"]),
    "body.jsonl": ('{"body": "a"}\n{"body": "b"}\n', ["body.jsonl", "no column 'text'", "['body']"]),
    "partial.jsonl": (
        '{"text": "a"}\n{"body": "b"}\n',
        ["partial.jsonl", "'text' is missing or null in 1 of 2 rows", "row 2"],
    ),
    "null.jsonl": ('{"text": null}\n', ["null.jsonl", "no column 'text'"]),
    "empty.parquet": ([], ["empty.parquet", "is empty"]),
    "garbage.parquet": (b"PAR1 not really", ["garbage.parquet", "not a readable Parquet file"]),
    "notes.txt": ("a\n", ["notes.txt", "unsupported extension '.txt'", ".jsonl"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_reader_names_the_file_and_the_problem(tmp_path, name):
    content, words = BAD_FILES[name]
    path = tmp_path / name
    if isinstance(content, list):
        write_parquet(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(RecipeError) as error:  # a ValueError: the CLI and mope.train print it in one line
        read_rows(DataSection(source=str(path)), ["text"])
    assert isinstance(error.value, ValueError)
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{tmp}/missing.jsonl", ["missing.jsonl", "does not exist"]),
        ("{tmp}/missing.txt", ["missing.txt", "does not exist"]),
        ("missing.txt", ["missing.txt", "does not exist"]),  # was looked up on the hub, retrying for 30 s
        ("./data/train", ["./data/train", "does not exist"]),
        ("{tmp}", ["is a folder", ".csv"]),
        ("builtin:stdlib", ["unknown data source 'builtin:stdlib'", "builtin:stdlib_docstrings"]),
    ],
)
def test_a_source_that_is_not_there_is_named(tmp_path, source, words):
    with pytest.raises(RecipeError) as error:
        read_rows(DataSection(source=source.format(tmp=tmp_path)))
    for word in words:
        assert word in str(error.value)


def test_every_format_reads_the_same_rows(tmp_path):
    import json

    files = {
        "rows.jsonl": "\n".join(json.dumps(row) for row in ROWS) + "\n",
        "rows.json": json.dumps(ROWS),
        "lines.json": "\n".join(json.dumps(row) for row in ROWS),  # JSON Lines in a .json file, as datasets reads
        "rows.csv": "\ufefftext,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    write_parquet(tmp_path / "rows.parquet", ROWS)
    for name in [*files, "rows.parquet"]:
        train, held_out = read_rows(DataSection(source=str(tmp_path / name), eval_fraction=0.5), ["text", "label"])
        assert sorted(train + held_out, key=lambda r: r["text"]) == ROWS, name


def test_rows_all_in_the_held_out_split_and_half_a_prompt_pair_are_refused(tmp_path):
    path = tmp_path / "one.jsonl"
    for text in (f"text {i}" for i in range(200)):  # a row whose text hashes into the held-out fifth
        path.write_text(f'{{"text": "{text}", "label": "a"}}\n')
        if not read_rows(DataSection(source=str(path)))[0]:
            break
    with pytest.raises(RecipeError, match=r"one\.jsonl: all 1 rows fell in the held-out split.*lower eval_fraction"):
        load_examples(DataSection(source=str(path)), "sequence_classification")
    with pytest.raises(ValueError, match=r"prompt_column.*response_column"):
        DataSection(source=str(path), prompt_column="text")
    # no row in the held-out split: its eval_loss read 0.0 (a perfect score) where nothing was measured
    path.write_text('{"text": "t", "label": "a"}\n')
    assert read_rows(DataSection(source=str(path)))[0]  # "t" hashes into train
    with pytest.raises(RecipeError, match=r"one\.jsonl: all 1 rows fell in the train split.*raise eval_fraction"):
        load_examples(DataSection(source=str(path)), "causal_lm")


@pytest.mark.parametrize(
    ("row", "task", "words"),
    [
        ({"text": ["a", "b"], "label": "x"}, "causal_lm", "column 'text' is a list or an object in 1 of 4"),
        ({"text": {"role": "user"}, "label": "x"}, "sequence_classification", "column 'text' is a list or an object"),
        ({"text": "a", "label": ["x"]}, "sequence_classification", "column 'label' is a list or an object"),
        ({"text": "  ", "label": "x"}, "causal_lm", "column 'text' is empty in 1 of 4 rows \\(first: row 4\\)"),
        ({"prompt": "p", "response": ""}, "causal_lm", "column 'response' is empty"),
        ({"prompt": [{"role": "user"}], "response": "r"}, "causal_lm", "column 'prompt' is a list or an object"),
    ],
)
def test_a_column_holding_a_list_an_object_or_no_text_is_refused(tmp_path, row, task, words):
    # a list or an object was trained on as its Python repr; a blank causal-LM text left a row without label tokens
    import json

    good = {key: "a b c" for key in row}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, good, good, row]))
    section = DataSection(
        source=str(path), **({"prompt_column": "prompt", "response_column": "response"} if "prompt" in row else {})
    )
    with pytest.raises(RecipeError, match=f"rows.jsonl: {words}"):
        load_examples(section, task)


def test_rows_that_share_a_prompt_fall_in_the_same_split(tmp_path):
    # the split hashed the whole row where there was no 'text' column: a prompt's other responses were in train
    import json

    rows = [{"prompt": f"question {i}", "response": f"answer {j}"} for i in range(40) for j in range(4)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = read_rows(DataSection(source=str(path), prompt_column="prompt", response_column="response"))
    assert held_out and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


# --- recipe YAML ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("model: {}\nmodel: {}\n", "model", "lines 1 and 2"),
        ("training:\n  max_steps: 2\n  epochs: 1\n  max_steps: 3\n", "max_steps", "lines 2 and 4"),
        ("adapter:\n  config: {r: 2, top_k: 1, r: 4}\n", "r", "lines 2 and 2"),
        ("model:\n  tiny_config:\n    hidden_size: 8\n    hidden_size: 16\n", "hidden_size", "lines 3 and 4"),
    ],
)
def test_a_key_given_twice_is_refused_at_any_depth(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert f"recipe {path}: key '{key}' is given twice ({lines})" in message and "remove one" in message


def test_overrides_refuse_duplicate_keys_and_bad_yaml_in_one_line():
    with pytest.raises(RecipeError, match=r"override 'adapter\.config=\{r: 2, r: 3\}': key 'r' is given twice"):
        load_recipe(TINY, ["adapter.config={r: 2, r: 3}"])
    with pytest.raises(RecipeError) as error:  # was a yaml.ParserError traceback
        load_recipe(TINY, ["training.max_steps=[2"])
    assert "not valid YAML" in str(error.value) and "\n" not in str(error.value)


def test_a_yaml_syntax_error_is_one_line_naming_file_and_place(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  task: [causal_lm\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"recipe {path} is not valid YAML") and "line 3" in str(error.value)
    assert "\n" not in str(error.value)


# --- checked_recipe: what `mope train` checks before accelerate launch ---------------------------------------


def test_checked_recipe_names_the_field_before_any_launch(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "body.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "a-file").write_text("x")
    cases = {
        "adapter.config.num_experts=0": "adapter.config: MoPEConfig.num_experts",
        "adapter.config.routerr=dense": "adapter.config: MoPEConfig.__init__() got an unexpected keyword argument 'routerr'",
        "model.tiny_config.model_type=lama": "model.tiny_config.model_type 'lama' is unknown",
        "model.tiny_config.hidden_size=wide": "model.tiny_config: ",
        f"model.tokenizer={tmp_path / 'tok'}": "model.tokenizer: folder",
        "model.tokenizer=package:no_such_package": "model.tokenizer: Python package 'no_such_package' is not installed",
        f"data.source={tmp_path / 'empty.jsonl'}": "empty.jsonl is empty",
        f"data.source={tmp_path / 'body.jsonl'}": "no column 'text'",
        f"training.output_dir={tmp_path / 'a-file'}": "training.output_dir: ",
        f"training.resume_from_checkpoint={tmp_path / 'ckpt'}": "training.resume_from_checkpoint: folder",
    }
    for override, words in cases.items():
        with pytest.raises(RecipeError) as error:
            checked_recipe(TINY, [override])
        assert words in str(error.value), override
    with pytest.raises(RecipeError, match=r"model\.name_or_path: folder .* has no config\.json"):
        checked_recipe(ROOT / "recipes" / "offline" / "minilm_stdlib_mope.yaml", [f"model.name_or_path={tmp_path}"])
    minilm = load_recipe(ROOT / "recipes" / "offline" / "minilm_stdlib_mope.yaml", ["model.name_or_path=/no/model"])
    with pytest.raises(RecipeError, match=r"model\.name_or_path: folder '/no/model' does not exist"):
        checked_recipe(ROOT / "recipes" / "offline" / "minilm_stdlib_mope.yaml", ["model.name_or_path=/no/model"])
    assert minilm.model.name_or_path == "/no/model"  # the schema alone accepted it


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_passes_checked_recipe(path, tmp_path, monkeypatch):
    """Hub ids and hub dataset names are left to the run; a recipe naming a local data file gets one with its columns."""
    monkeypatch.chdir(tmp_path)  # the recipes' relative output_dir: not an earlier run in the checkout (make demo's)
    recipe = load_recipe(path)
    if recipe.data.source.endswith(".jsonl"):  # qwen2_0p5b_capacity: "launch with data.source=my_data.jsonl"
        with pytest.raises(RecipeError, match="does not exist"):
            checked_recipe(path)
        data = tmp_path / "my_data.jsonl"
        data.write_text("".join(f'{{"prompt": "p{i}", "response": "r{i}"}}\n' for i in range(20)))
        checked_recipe(path, [f"data.source={data}"])
    else:
        checked_recipe(path)


def test_a_model_or_tokenizer_that_does_not_load_is_a_recipe_error_naming_the_field(tmp_path):
    """What the run itself meets (a hub id that is not there, a folder without a tokenizer): mope.train prints
    a RecipeError in one line, where an OSError was a traceback."""
    recipe = load_recipe(TINY, ["model.tiny_config=null", "model.name_or_path=no-such-org/no-such-model"])
    with pytest.raises(RecipeError, match=r"model\.name_or_path: cannot load 'no-such-org/no-such-model'"):
        build_model(recipe.model, None, 0)
    with pytest.raises(RecipeError, match=r"model\.tokenizer: no tokenizer in '.*'"):
        load_tokenizer(load_recipe(TINY, [f"model.tokenizer={tmp_path}"]).model)


def write_task_rows(path: Path, tasks: list) -> Path:
    import json

    path.write_text(
        "".join(json.dumps({"text": f"word {i} more words", "task": t}) + "\n" for i, t in enumerate(tasks))
    )
    return path


TASK_LEVEL = ["adapter.config.routing_level=task", "adapter.config.num_tasks=2"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (TASK_LEVEL, r"adapter\.config\.routing_level='task' needs data\.task_column"),  # failed at the first step
        (["data.task_column=task"], r"data\.task_column is read only with adapter\.config\.routing_level='task'"),
        (["adapter.config.localized_balance_coef=0.1"], r"localized_balance_coef > 0 needs data\.group_column"),
        (["data.group_column=task"], r"data\.group_column is read only with .*localized_balance_coef"),
    ],
)
def test_id_columns_and_what_reads_them_come_together(overrides, words):
    with pytest.raises(RecipeError, match=words):
        load_recipe(TINY, overrides)


@pytest.mark.parametrize(
    ("tasks", "words"),
    [
        ([0, 1, 2, 0], r"column 'task' holds id 2 in row 3, but adapter\.config\.num_tasks=2"),
        ([0, 1, "x", 0], r"column 'task' holds 'x' in row 3; ids are integers >= 0"),
        ([0, True, 1, 0], r"column 'task' holds True in row 2"),
    ],
)
def test_bad_task_ids_are_refused_before_a_launch(tmp_path, tasks, words):
    data = write_task_rows(tmp_path / "tasks.jsonl", tasks * 10)
    overrides = [*TASK_LEVEL, "data.task_column=task", f"data.source={data}", f"training.output_dir={tmp_path / 'out'}"]
    with pytest.raises(RecipeError, match=words):
        checked_recipe(TINY, overrides)


def test_a_task_column_reaches_the_model_as_its_task_ids(tmp_path):
    from mope.training.data import Collator

    data = write_task_rows(tmp_path / "tasks.jsonl", ["0", "1"] * 20)  # a CSV's digits count too
    recipe = checked_recipe(
        TINY, [*TASK_LEVEL, "data.task_column=task", f"data.source={data}", f"training.output_dir={tmp_path}"]
    )
    examples = load_examples(
        recipe.data, recipe.model.task, id_bounds(recipe.data, adapter_config(recipe.adapter, recipe.model.task))
    )
    batch = Collator(load_tokenizer(recipe.model), recipe.data, recipe.model.task, None)(examples.train[:4])
    assert batch["mope_task_ids"].tolist() == [int(row["task"]) for row in examples.train[:4]]


@pytest.mark.parametrize(
    "overrides",
    [
        [*TASK_LEVEL, "data.task_column=task"],
        ["adapter.config.localized_balance_coef=0.1", "data.group_column=task"],  # LoRAMoE's loss reads group ids
    ],
)
def test_a_recipe_with_an_id_column_trains_and_evaluates(tmp_path, overrides):
    from mope.training.loop import run

    data = write_task_rows(tmp_path / "tasks.jsonl", [0, 1] * 20)
    out = [f"data.source={data}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=2"]
    summary = run(load_recipe(TINY, [*overrides, *out, "training.save_every=null"]))
    assert summary["eval_loss"] > 0
