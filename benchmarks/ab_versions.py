"""A/B of the training step between this mope and an older commit's, in one run, on the bench's shapes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ab_versions.py --baseline REV          # e.g. a commit hash
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ab_versions.py --baseline REV --quick  # smoke run

For a refactor that must not change speed. The baseline's ``mope`` package is exported from git
(``git archive REV mope``) into a temporary folder. Each round starts one process per version, in
alternating order (A B, then B A, ...); a process builds a MoPE top-2 of 8 (r=8, aux losses on)
and a PEFT LoRA r=16 on the same frozen base and times their training steps interleaved, on the
rows of ``make bench``'s step table: the tiny Llamas at hidden 256 and 1024 and the real MiniLM
(``step_time.py`` builds them). Per round and row, ``MoPE new / MoPE old`` is the raw ratio; the
same ratio divided by ``LoRA new / LoRA old`` (LoRA's code is PEFT's, the same in both) takes out
what the machine drifted between the two processes. Reported: the median over rounds, with the
range. Writes ``DIR/ab_versions_cpu.md`` and ``.json`` (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = ("llama_h256", "llama_h1024", "minilm")


def child(rows: list[str], reps: int, quick: bool) -> dict[str, dict[str, list[float]]]:
    """In this process's mope: per row, the step times (s) of MoPE and LoRA, interleaved."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import step_time

    settings = step_time.QUICK if quick else step_time.FULL
    if quick:
        torch.set_num_threads(1)
    bases = {
        "llama_h256": settings.step_shapes[0],
        "llama_h1024": settings.step_shapes[-1],
    }
    times: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row == "minilm":
            build, batch = step_time.minilm_base(*settings.minilm_batch)
            shape = settings.step_shapes[0]
        else:
            shape = bases[row]
            batch = step_time.make_batch(shape, "cpu")

            def build(shape=shape):
                return step_time.build_base(shape)

        with tempfile.TemporaryDirectory() as workdir:
            models = {
                "mope": step_time.attach_mope(8)(build(), shape, Path(workdir)),
                "lora": step_time.attach_peft_lora(16)(build(), shape, Path(workdir)),
            }
        times[row] = {name: [] for name in models}
        for rep in range(reps + 1):  # the first round warms up
            for name, model in models.items() if rep % 2 == 0 else reversed(models.items()):
                model.train()
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                model(**batch).loss.backward()
                if rep:
                    times[row][name].append(time.perf_counter() - started)
    return times


def export_baseline(rev: str, folder: Path) -> None:
    archive = subprocess.run(["git", "archive", rev, "mope"], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)


def run_version(path: Path, rows: list[str], reps: int, quick: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        ",".join(rows),
        "--reps",
        str(reps),
        *(["--quick"] if quick else []),
    ]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=path)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def summary(values: list[float]) -> str:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{statistics.median(values):.3f} [{quartiles[0]:.3f}-{quartiles[2]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git revision whose mope package is the A side")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per model and process")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds, 2 reps: a smoke test")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import mope

        times = child(args.child.split(","), args.reps, args.quick)
        print(json.dumps({"mope_file": mope.__file__, "times": times}))
        return
    if not args.baseline:
        parser.error("--baseline REV is required")
    rounds, reps = (2, 2) if args.quick else (args.rounds, args.reps)
    rows = args.rows.split(",")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as baseline_dir:
        export_baseline(args.baseline, Path(baseline_dir))
        versions = {"old": Path(baseline_dir), "new": REPO_ROOT}
        results: list[dict] = []
        for index in range(rounds):
            order = ("old", "new") if index % 2 == 0 else ("new", "old")
            runs = {name: run_version(versions[name], rows, reps, args.quick) for name in order}
            for name, run in runs.items():  # each side imported its own package
                if not run["mope_file"].startswith(str(versions[name])):
                    raise SystemExit(f"the {name} side imported mope from {run['mope_file']}, not {versions[name]}")
            results.append({name: run["times"] for name, run in runs.items()})
    table = []
    for row in rows:
        med = {
            (v, m): [statistics.median(r[v][row][m]) for r in results] for v in ("old", "new") for m in ("mope", "lora")
        }
        raw = [n / o for n, o in zip(med["new", "mope"], med["old", "mope"], strict=True)]
        control = [n / o for n, o in zip(med["new", "lora"], med["old", "lora"], strict=True)]
        table.append(
            {
                "row": row,
                "mope_new_over_old": raw,
                "lora_new_over_old": control,
                "normalised": [r / c for r, c in zip(raw, control, strict=True)],
                "mope_ms_old": statistics.median(med["old", "mope"]) * 1e3,
                "mope_ms_new": statistics.median(med["new", "mope"]) * 1e3,
            }
        )
    import torch

    machine = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        f"# Training step, this mope ({head.stdout.strip()}) against {args.baseline}, CPU",
        "",
        f"Machine: {machine}; {rounds} rounds x {reps} steps per model and process; {time.strftime('%Y-%m-%d')}.",
        "MoPE top-2 of 8 (r=8, aux losses on), PEFT LoRA r=16; step = forward + backward (step_time.py's shapes).",
        "Ratios: median over rounds [25-75 %]; 'normalised' divides by LoRA's new/old (the machine's drift).",
        "",
        "| row | MoPE ms old | MoPE ms new | MoPE new/old | LoRA new/old | normalised |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['row']} | {t['mope_ms_old']:.1f} | {t['mope_ms_new']:.1f} | {summary(t['mope_new_over_old'])} | "
            f"{summary(t['lora_new_over_old'])} | {summary(t['normalised'])} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ab_versions_quick" if args.quick else "ab_versions_cpu"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"baseline": args.baseline, "rows": table}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
