"""Writes tests/bundles/old/<commit>/: bundles saved by an older mope, with the logits they gave.

    git archive <commit> mope | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/bundles/old/write_bundles.py save tests/bundles/old/<commit>
    .venv/bin/python tests/bundles/old/write_bundles.py load tests/bundles/old/<commit>   # check with this mope

tests/bundles/test_old_bundles.py loads every case with the current mope and expects the same logits.
Task ids are passed the way the writing mope reads them (``task_ids`` before the rework,
``mope_task_ids`` after it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for conftest
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import mope

LLAMA = {"task_type": "CAUSAL_LM"}
CASES = {
    "top_k_llama": ("llama", {**LLAMA, "target_modules": ["q_proj", "down_proj"], "top_k": 2}),
    "dense_bert": ("bert", {"task_type": "SEQ_CLS", "target_modules": ["query"], "router": "dense"}),
    "adapter_series": (
        "llama",
        {**LLAMA, "target_modules": ["q_proj", "v_proj"], "expert_type": "adapter", "adapter_placement": "series"},
    ),
    "ia3": (
        "llama",
        {
            **LLAMA,
            "target_modules": ["q_proj", "down_proj"],
            "expert_type": "ia3",
            "feedforward_modules": ["down_proj"],
        },
    ),
    "shared_a": (
        "llama",
        {**LLAMA, "target_modules": ["q_proj"], "expert_type": "lora_shared_a", "num_shared_experts": 1},
    ),
    "ffn_block": (
        "llama",
        {**LLAMA, "target_modules": ["mlp"], "num_experts": 2, "top_k": 1, "layers_to_transform": [0]},
    ),
    "hierarchical": (
        "llama",
        {**LLAMA, "target_modules": ["q_proj"], "router": "hierarchical", "top_k": 1, "num_groups": 2},
    ),
    "dselect_k": ("llama", {**LLAMA, "target_modules": ["q_proj"], "router": "dselect_k", "top_k": 2}),
    "cosine": ("llama", {**LLAMA, "target_modules": ["q_proj"], "router": "cosine", "top_k": 2}),
    "soft_tokens": (
        "bert",
        {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "router": "soft_tokens", "slots_per_expert": 2},
    ),
    "soft_merge": (
        "llama",
        {**LLAMA, "target_modules": ["q_proj"], "router": "soft_merge", "routing_level": "sequence"},
    ),
    "task_level": ("llama", {**LLAMA, "target_modules": ["q_proj"], "routing_level": "task", "num_tasks": 3}),
    "schedule": (
        "llama",
        {
            **LLAMA,
            "target_modules": ["q_proj"],
            "top_k": 1,
            "router_schedule_steps": 4,
            "router_schedule_start_top_k": 4,
        },
    ),
    "noisy": ("llama", {**LLAMA, "target_modules": ["q_proj"], "router_noise": True, "top_k": 2}),
}


def logits(model, name: str, kind: str) -> torch.Tensor:
    batch = make_batch(kind, pad=2)
    batch.pop("labels")
    extra = {}
    if name == "task_level":  # ScheduleCallback came with mope_task_ids
        key = "mope_task_ids" if hasattr(mope, "ScheduleCallback") else "task_ids"
        extra = {key: torch.tensor([1, 2])}
    with torch.no_grad():
        return model(**batch, **extra).logits


def save(folder: Path) -> None:
    for name, (kind, kwargs) in CASES.items():
        torch.manual_seed(3)
        config = mope.MoPEConfig(init_weights=False, **{"r": 2, "num_experts": 4, **kwargs})
        model = get_peft_model(make_model(kind), config)
        model.train()
        if name == "schedule":  # two training forwards: the saved step is 2
            for _ in range(2):
                model(**make_batch(kind))
        model.eval()
        model.save_pretrained(folder / name)
        os.remove(folder / name / "README.md")
        save_file({"logits": logits(model, name, kind).contiguous()}, folder / name / "logits.safetensors")


def check(folder: Path) -> list[str]:
    differ = []
    for name, (kind, _) in CASES.items():
        loaded = PeftModel.from_pretrained(make_model(kind), folder / name)
        if not torch.equal(logits(loaded, name, kind), load_file(folder / name / "logits.safetensors")["logits"]):
            differ.append(name)
    return differ


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "save":
        save(where)
    else:
        print("differ:", check(where))
    print("mope from", mope.__file__)
