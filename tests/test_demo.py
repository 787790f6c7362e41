"""mope.demo's seeds: what it trains per seed and what its table claims (no training: launch is replaced)."""

from __future__ import annotations

import subprocess
import sys

from mope import demo


def fake_summaries(monkeypatch, accuracies: dict[str, list[float]]) -> list[tuple[str, list[str]]]:
    """Replace the launches with summaries of the given accuracies; returns the (recipe, overrides) launched."""
    launched = []
    count = {"mope": 0, "lora": 0}

    def launch(recipe: str, overrides: list[str]) -> dict:
        launched.append((recipe, overrides))
        method = "mope" if recipe == demo.RECIPES["mope"] else "lora"
        accuracy = accuracies[method][count[method]]
        count[method] += 1
        return {"eval_accuracy": accuracy, "train_seconds": 10.0, "trainable_parameters": 1000}

    monkeypatch.setattr(demo, "launch", launch)
    return launched


def test_three_seeds_train_each_method_per_seed_and_the_table_shows_their_mean_and_range(monkeypatch, capsys):
    launched = fake_summaries(monkeypatch, {"mope": [0.70, 0.80, 0.75], "lora": [0.72, 0.74, 0.76]})
    results = demo.train_both("out", 3, 20, ["training.epochs=1"])
    assert [len(runs) for runs in results.values()] == [3, 3]
    seeds = [next(o for o in overrides if o.startswith("training.seed=")) for _, overrides in launched]
    assert seeds == ["training.seed=0"] * 2 + ["training.seed=1"] * 2 + ["training.seed=2"] * 2
    folders = {next(o for o in overrides if o.startswith("training.output_dir=")) for _, overrides in launched}
    assert len(folders) == 6  # no seed overwrites another's run (seed 0 keeps out/mope: the reload check's)
    assert "training.output_dir=out/mope" in folders
    demo.print_table(results, 20, 3)
    table = capsys.readouterr().out
    assert "eval accuracy (mean of seeds 0-2)" in table
    assert "| 0.7500 (0.7000-0.8000) |" in table and "| 0.7400 (0.7200-0.7600) |" in table
    assert "One seed" not in table


def test_one_seed_says_it_is_one_seed_and_what_that_cannot_show(monkeypatch, capsys):
    fake_summaries(monkeypatch, {"mope": [0.70], "lora": [0.72]})
    demo.print_table(demo.train_both("out", 1, 20, []), 20, 1)
    table = capsys.readouterr().out
    assert "eval accuracy (seed 0)" in table and "| 0.7000 |" in table
    assert "One seed:" in table and "--seeds 3" in table


def test_seeds_below_one_are_refused_before_anything_runs():
    done = subprocess.run(
        [sys.executable, "-m", "mope.demo", "--seeds", "0"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "--seeds must be at least 1, got 0" in done.stderr
