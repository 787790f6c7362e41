"""Host instructions per training step, counted by valgrind's callgrind: the deterministic twin of the host table.

``step_time.py --sections host`` times the tiny Llama's step at hidden 32 on one thread, where the time is the
host's Python, autograd and aten dispatch work; on a shared machine those times drift by a quarter between
runs, more than most changes to that work. This counts the instructions the same step executes instead: the
same count (to about 0.1 %) every run, so an A/B of two versions needs one run of each (instructions are not time: cache
misses and allocator locks weigh differently, so report both).

Each candidate runs in its own process under callgrind with instrumentation off while it imports, builds the
model and warms up (10 steps); then ``callgrind_control`` turns it on and the process runs ``--steps`` steps
inside ``functools.reduce``, the one C function callgrind collects in (``--toggle-collect``). Triton launches
run nothing, as in the host table (:func:`step_time.skipped_launch`). Needs valgrind (Debian: ``valgrind``);
about a minute per candidate, ``--jobs`` at a time.

    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/host_instructions.py [--steps 5] [--jobs 2]
    ... --only peft_lora_r16,mope_top2_of_8_triton --out DIR --name NAME
    ... --rev REV         # count another commit's mope (exported with `git archive REV mope`): an A/B in two runs
    ... --free-launches   # Triton launches cost nothing at all (not even the stand-in's zeroing): the host work
                          # around the kernels alone (rows whose torch ops index with a kernel's output may fail)

It writes ``DIR/NAME.json`` and ``DIR/NAME.md`` (default ``benchmarks/results/host_instructions_cpu``, with
``--free-launches`` ``host_instructions_free_launches_cpu``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import step_time
import torch

REPO = Path(__file__).resolve().parent.parent
REFERENCE = step_time.REFERENCE_LORA
CANDIDATES = {
    REFERENCE: step_time.CANDIDATES_BY_NAME[REFERENCE],
    **{
        f"mope_top2_of_{n}_{dispatch}{suffix}": step_time.Candidate(
            f"mope_top2_of_{n}_{dispatch}{suffix}",
            f"MoPE top-2 of {n}, r=8, aux losses {'off' if suffix else 'on'} [dispatch={dispatch}]",
            step_time.attach_mope(n, aux_losses=not suffix, dispatch=dispatch),
        )
        for n, dispatch, suffix in [
            (8, "masked", ""),
            (8, "triton", ""),
            (8, "triton", "_no_aux"),
            (64, "triton", ""),
        ]
    },
}
WARMUP = 10


def free_launch(original, kernel, *args, **kwargs) -> None:
    """A Triton launch that does nothing at all (``--free-launches``)."""


def child(name: str, steps: int, rundir: Path, free: bool = False) -> None:
    """Build and warm up ``name``'s step, say so in ``rundir/ready``, wait for ``rundir/go``, run ``steps`` steps."""
    torch.set_num_threads(1)
    candidate = CANDIDATES[name]
    launch = free_launch if free else step_time.skipped_launch
    with step_time.replaced_triton_launches(launch), tempfile.TemporaryDirectory() as workdir:
        built, errors = step_time.build_steps(
            (candidate,), step_time.FULL.host_shape, "cpu", torch.float32, Path(workdir)
        )
        if errors:
            raise SystemExit(f"{name}: {errors[name]}")
        step = built[name]
        for _ in range(WARMUP):
            step()
        (rundir / "ready").write_text(str(os.getpid()))
        while not (rundir / "go").exists():
            time.sleep(0.05)
        functools.reduce(lambda _, __: step(), range(steps), None)


def count(name: str, steps: int, mope_dir: Path | None = None, free: bool = False) -> float | str:
    """Instructions per step of ``name`` (its own process under callgrind), or a note saying why there are none.

    ``mope_dir``: a directory holding another ``mope`` package for the child to import (first on its path)."""
    with tempfile.TemporaryDirectory() as tmp:
        rundir = Path(tmp)
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
            "--toggle-collect=functools_reduce", f"--callgrind-out-file={rundir / 'callgrind.out'}",
            sys.executable, __file__, "--child", name, "--steps", str(steps), "--rundir", str(rundir),
            *(["--free-launches"] if free else []),
        ]  # fmt: skip
        with open(rundir / "log", "w") as log:
            env = dict(os.environ)
            if mope_dir is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(mope_dir), *filter(None, [env.get("PYTHONPATH")])])
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            while not (rundir / "ready").exists() and process.poll() is None:
                time.sleep(0.2)
            if process.poll() is None:  # valgrind runs the program in its own process: same pid
                subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], capture_output=True, check=False)
                (rundir / "go").touch()
            process.wait()
        output = (rundir / "log").read_text()
    collected = re.search(r"Collected : (\d+)", output)
    if process.returncode != 0 or collected is None or int(collected.group(1)) == 0:
        return f"error: exit {process.returncode}: " + " ".join(output.strip().splitlines()[-1:])[:200]
    return int(collected.group(1)) / steps


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Host instructions per training step (callgrind)",
        "",
        "Measured on: " + ", ".join(f"{key} {value}" for key, value in info.items()) + ".",
        "",
        f"Tiny {step_time.FULL.host_shape.describe()}, 28 adapted modules, fp32, 1 thread; Triton launches: "
        f"{info['launches']}; instructions of {info['steps']} steps after {WARMUP} warm-up steps, per step. The same "
        "count to about 0.1 % every run (instructions, not time).",
        "",
        "| candidate | instructions per step (M) | vs PEFT LoRA r=16 |",
        "|---|---|---|",
    ]
    for row in rows:
        value = row["instructions"]
        if isinstance(value, str):
            lines.append(f"| {row['label']} | {value} | |")
        else:
            ratio = f"{row['ratio']:.3f}x" if row.get("ratio") is not None else ""
            lines.append(f"| {row['label']} | {value / 1e6:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", help="results file stem (default: host_instructions[_free_launches]_cpu)")
    parser.add_argument("--rev", help="count this commit's mope package (git archive), not the working tree's")
    parser.add_argument("--free-launches", action="store_true", help="Triton launches do nothing at all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rundir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.rundir, args.free_launches)
        return
    names = [name for name in args.only.split(",") if name] or list(CANDIDATES)
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        parser.error(f"--only: unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} not found: install valgrind (Debian: apt-get install valgrind)")
    if os.environ.get("TRITON_INTERPRET") != "1" and any("triton" in name for name in names):
        parser.error("the dispatch=triton rows run on CPU only under Triton's interpreter: set TRITON_INTERPRET=1")
    with tempfile.TemporaryDirectory() as exported, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        mope_dir = None
        if args.rev:
            mope_dir = Path(exported)
            archive = subprocess.run(["git", "archive", args.rev, "mope"], capture_output=True, check=False, cwd=REPO)
            if archive.returncode != 0:
                parser.error(f"--rev {args.rev}: git archive failed: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", exported], input=archive.stdout, check=True)
        counted = pool.map(lambda name: count(name, args.steps, mope_dir, args.free_launches), names)
        counts = dict(zip(names, counted, strict=True))
    reference = counts.get(REFERENCE)
    rows = []
    for name in names:
        value = counts[name]
        ratio = value / reference if isinstance(value, float) and isinstance(reference, float) else None
        rows.append({"name": name, "label": CANDIDATES[name].label, "instructions": value, "ratio": ratio})
    info = {**step_time.machine(), "steps": args.steps}
    if importlib.util.find_spec("triton") is not None:
        info["triton"] = importlib.metadata.version("triton")
    info["torch_threads"] = 1
    if args.rev:
        info["mope"] = f"{args.rev} (--rev: git archive)"
    info["launches"] = "free (--free-launches)" if args.free_launches else "step_time.skipped_launch"
    text = markdown(rows, info)
    name = args.name or ("host_instructions_free_launches_cpu" if args.free_launches else "host_instructions_cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
