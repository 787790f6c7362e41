"""Collapse to one LoRA and export as a plain PEFT LoRA bundle (mope.export)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from conftest import make_batch, make_model, mope_model
from conftest import three_row_logits as logits
from safetensors.torch import load_file, save_file

import mope


def load_lora(name: str, folder) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(make_model(name), folder).eval()


TASK = {"routing_level": "task", "num_tasks": 3, "top_k": 2}


# (model, MoPE config kwargs, task to fix or None): routing that does not depend on the input.
EXACT_CASES = {
    "llama-one-expert": ("llama", {}, None),
    "gpt2-conv1d-one-expert": ("gpt2", {}, None),
    "bert-classifier-head": ("bert", {}, None),
    "llama-task-top2-shared": ("llama", {**TASK, "num_experts": 5, "num_shared_experts": 1}, 2),
    "llama-task-shared-a": ("llama", {**TASK, "num_experts": 4, "expert_type": "lora_shared_a"}, 1),
    "llama-task-per-module-counts": ("llama", {**TASK, "num_experts": 2, "num_experts_pattern": {"q_proj": 4}}, 0),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_concat_export_reproduces_fixed_routing_and_merges(case, tmp_path):
    name, kwargs, task = EXACT_CASES[case]
    model = mope_model(name, **kwargs)
    if name == "bert":  # the trained head must travel with the LoRA
        model.base_model.model.classifier.modules_to_save["default"].weight.data += 0.5
    extra = {} if task is None else {"mope_task_ids": torch.full((3,), task)}
    want = logits(model, name, **extra)
    with mope.fix_task(model, task) if task is not None else torch.no_grad():
        mope.export_lora(model, tmp_path, method="concat")
    loaded = load_lora(name, tmp_path)
    torch.testing.assert_close(logits(loaded, name), want, rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == saved["r"]
    assert saved["fan_in_fan_out"] == (name == "gpt2")
    merged = loaded.merge_and_unload()  # PEFT's own merge of the collapsed mixture is exact too
    torch.testing.assert_close(logits(merged, name), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_mode", ["factors", "delta"])
def test_soft_merge_with_a_fixed_task_exports_and_merges_what_its_forward_computes(lora_mode, tmp_path):
    """router='soft_merge' runs one merged expert: with soft_merge_lora='factors' that is the rank-r LoRA
    (sum_e g_e A_e, s sum_e g_e B_e), not the mixture s sum_e g_e B_e^T A_e, which 'delta' computes. Both
    collapse, export and merge exactly under a fixed task (per-module expert counts too)."""
    model = mope_model(
        "llama",
        routing_level="task",
        num_tasks=3,
        num_experts=3,
        num_experts_pattern={"q_proj": 4},
        router="soft_merge",
        soft_merge_lora=lora_mode,
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base_weight = layer.base_layer.weight.clone()
    want = logits(model, "llama", mope_task_ids=torch.full((3,), 2))
    with mope.fix_task(model, 2):
        config, _ = mope.collapse_to_lora(model, method="concat")
        mope.export_lora(model, tmp_path / "concat", method="concat")
        mope.export_lora(model, tmp_path / "svd", method="svd")  # rank=None: full rank, exact
        model.merge_adapter()
    for folder in ("concat", "svd"):
        torch.testing.assert_close(logits(load_lora("llama", tmp_path / folder), "llama"), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, "llama"), want, rtol=0, atol=1e-5)  # merged: no task needed
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, base_weight, rtol=0, atol=1e-6)
    mope.fix_task(model, 2)  # not as a context: stays fixed
    torch.testing.assert_close(logits(model.merge_and_unload(), "llama"), want, rtol=0, atol=1e-5)
    assert config.r == (2 if lora_mode == "factors" else 4 * 2)  # one merged rank-r LoRA, or the stacked N·r


def test_router_that_always_picks_one_expert_collapses_to_that_expert(tmp_path):
    model = mope_model("llama", routing_level="task", num_tasks=1, num_experts=4, top_k=1)
    with mope.routing_stats(model) as stats:
        want = logits(model, "llama", mope_task_ids=torch.zeros(3, dtype=torch.long))
    report = stats.report()
    assert all(sorted(entry["load"])[-1] == 1.0 for entry in report.values())
    config, _ = mope.collapse_to_lora(model, method="concat", usage=report)
    assert config.r == 4 * 2
    mope.export_lora(model, tmp_path, method="concat", usage=report)
    torch.testing.assert_close(logits(load_lora("llama", tmp_path), "llama"), want, rtol=0, atol=1e-5)


def test_usage_from_routing_stats_is_the_gate_weight_each_expert_received(tmp_path):
    # the report's load is the dispatch share (1/k per chosen expert whatever its weight): a constant top-2 gate of
    # [0, 0, 0.18, 0.82] collapsed as [0, 0, 0.5, 0.5], 0.38 off where the mixture moves the logits 0.83
    model = mope_model("llama", routing_level="task", num_tasks=1, num_experts=4, top_k=2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "mope_router" in name:
                parameter.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    with mope.routing_stats(model) as stats:
        want = logits(model, "llama", mope_task_ids=torch.zeros(3, dtype=torch.long))
    report = stats.report()
    with mope.fix_task(model, 0):
        gates = {
            name: layer.router_for("default").fixed_weights()
            for name, layer in model.named_modules()
            if isinstance(layer, mope.MoPELayer)
        }
    for module, gate in gates.items():
        assert sorted(report[module]["load"])[-2:] == [0.5, 0.5]  # top-2: half the dispatch each, unlike the gate
        torch.testing.assert_close(torch.tensor(report[module]["weight"]), gate.float(), rtol=0, atol=1e-6)
    mope.export_lora(model, tmp_path, method="concat", usage=report)
    torch.testing.assert_close(logits(load_lora("llama", tmp_path), "llama"), want, rtol=0, atol=1e-5)


def delta(state: dict, module: str) -> torch.Tensor:
    prefix = f"base_model.model.{module}"
    return state[f"{prefix}.lora_B.weight"].double() @ state[f"{prefix}.lora_A.weight"].double()


def test_svd_is_the_best_low_rank_approximation_of_the_usage_weighted_update():
    model = mope_model("llama", num_experts=4, top_k=2, r=4, target_modules=["q_proj", "down_proj"])
    usage = {
        layer.module_name: torch.tensor([0.5, 0.3, 0.2, 0.0])
        for layer in model.modules()
        if isinstance(layer, mope.MoPELayer)
    }
    _, exact = mope.collapse_to_lora(model, method="concat", usage=usage)
    full_config, full = mope.collapse_to_lora(model, method="svd", usage=usage)
    low_config, low = mope.collapse_to_lora(model, method="svd", rank=3, usage=usage)
    assert (full_config.r, low_config.r) == (16, 3)
    for module in usage:
        target = delta(exact, module)
        torch.testing.assert_close(delta(full, module), target, rtol=0, atol=1e-6)
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(delta(low, module), best, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("num_experts", "r", "cap"), [(3, 2, 6), (8, 16, 64)])  # N·r, or min(in, out) = 64
def test_svd_rank_above_what_the_update_can_have_is_capped_with_a_warning(num_experts, r, cap):
    model = mope_model("llama", num_experts=num_experts, top_k=2, r=r, target_modules=["q_proj", "down_proj"])
    full_config, full = mope.collapse_to_lora(model, method="svd")
    with pytest.warns(mope.export.RankCappedWarning, match=rf"rank=100000 is more .* at most {cap} .* r={cap}"):
        config, capped = mope.collapse_to_lora(model, method="svd", rank=100_000)  # was r=100000, zero-padded
    assert config.r == full_config.r == cap
    assert capped.keys() == full.keys() and all(torch.equal(capped[key], full[key]) for key in full)


@pytest.mark.slow
def test_export_loads_in_a_process_that_never_imports_mope(tmp_path):
    model = mope_model("llama", routing_level="task", num_tasks=2, num_experts=3, top_k=2)
    batch = make_batch("llama", batch=3, pad=2)
    with mope.fix_task(model, 1):
        mope.export_lora(model, tmp_path / "lora", method="svd", rank=6)
        with torch.no_grad():
            want = model(**batch).logits  # no task_ids: the fixed task
    # rank 6 = N·r: the svd is full rank, hence exact
    make_model("llama").save_pretrained(tmp_path / "base")
    save_file({"want": want.contiguous(), **batch}, str(tmp_path / "check.safetensors"))
    code = textwrap.dedent(
        f"""
        import sys, torch, transformers, peft
        from safetensors.torch import load_file
        data = load_file({str(tmp_path / "check.safetensors")!r})
        base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = peft.PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        with torch.no_grad():
            got = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        torch.testing.assert_close(got, data["want"], rtol=0, atol=1e-5)
        assert "mope" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


BAD_OPTIONS = {
    "method": ({"method": "average"}, "method"),
    "rank-with-concat": ({"method": "concat", "rank": 4}, "rank"),
    "rank-zero": ({"rank": 0}, "rank"),
    "usage-shape": ({"usage": {"model.layers.0.self_attn.q_proj": [1.0, 2.0, 3.0]}}, "shape"),
    "usage-unknown": ({"usage": {"model.nope": [1.0, 1.0]}}, "model.nope"),
    "usage-missing": ({"usage": {"model.layers.0.self_attn.q_proj": [1.0, 0.0]}}, "no entry for module"),
    "usage-negative": ({"usage": {"model.layers.0.self_attn.q_proj": [1.0, -1.0]}}, "usage\\['model.layers.0"),
    "adapter-name": ({"adapter_name": "other"}, "adapter_name='other'"),
    # a TypeError from torch before
    "usage-text": ({"usage": {"model.layers.0.self_attn.q_proj": "0.5,0.5"}}, "q_proj'\\] is not a list of numbers"),
    "usage-load-text": ({"usage": {"model.layers.0.self_attn.q_proj": {"load": "x"}}}, "is not a list of numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_raise_and_leave_an_old_bundle_intact(case, tmp_path):
    options, message = BAD_OPTIONS[case]
    model = mope_model("llama", num_experts=2, target_modules=["q_proj"])
    mope.export_lora(model, tmp_path, method="concat")
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=message):
        mope.export_lora(model, tmp_path, **options)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_non_lora_experts_are_refused_by_name():
    model = mope_model("llama", num_experts=2, target_modules=["q_proj"], expert_type="adapter")
    with pytest.raises(ValueError, match="expert_type='adapter'"):
        mope.collapse_to_lora(model)


def test_export_is_saved_in_the_experts_dtype(tmp_path):
    model = mope_model("llama", num_experts=2, target_modules=["q_proj"]).to(torch.bfloat16)
    mope.export_lora(model, tmp_path, rank=2)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_block_routing_usage_is_read_from_the_blocks_router(tmp_path):
    """With router_blocks, routing_stats reports the leader's module only; its followers use that entry."""
    model = mope_model(
        "llama",
        routing_level="task",
        num_tasks=1,
        num_experts=3,
        top_k=1,
        target_modules=["q_proj", "k_proj", "v_proj"],
        router_blocks=["self_attn"],
    )
    with mope.routing_stats(model) as stats:
        want = logits(model, "llama", mope_task_ids=torch.zeros(3, dtype=torch.long))
    report = stats.report()
    assert len(report) == 2  # one router per layer's attention block
    mope.export_lora(model, tmp_path, method="concat", usage=report)
    torch.testing.assert_close(logits(load_lora("llama", tmp_path), "llama"), want, rtol=0, atol=1e-5)
