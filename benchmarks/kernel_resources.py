"""Registers, spills and shared memory of every Triton kernel variant the tests launch, compiled for a GPU here.

No GPU needed: ``tests/test_triton_kernels.py`` is run under Triton's interpreter once, recording each distinct
launch (``tests/kernel_specs.py``); each is then compiled by Triton for ``--arch`` with each ``--warps`` (and the
pipelining stages :func:`mope.kernels.grid.stages_for` gives that GPU), and ``ptxas -v`` (shipped with Triton)
reads the registers a thread uses and the bytes it spills to local memory. One row per kernel and ``tl.dot``
operand type: its variants, and over them the most registers, how many spill and the most spilled, per warp count.
What this does not say is speed: a GPU times that.

    .venv/bin/python benchmarks/kernel_resources.py [--arch 90] [--warps 4,8] [--launches FILE] [--out DIR]

It writes ``DIR/kernel_resources_sm90.md`` (default ``benchmarks/results``); ``--launches`` reuses a recorded
file instead of running the tests (minutes under the interpreter).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
from kernel_specs import SHARED_MEMORY, compile_kernel, compile_set  # noqa: E402  (the tests' launch records)


def record_launches(path: Path) -> None:
    """Run the kernel tests under the interpreter, recording their distinct launches to ``path``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "MOPE_KERNEL_LAUNCHES": str(path)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_triton_kernels.py"]
    subprocess.run(command, cwd=TESTS, env=env, check=True, stdout=subprocess.DEVNULL)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of spill stores that ``ptxas -v`` reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={target}", str(source), "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def compile_usage(spec: dict, arch: int, options: dict) -> tuple[int, int, int]:
    """Registers, spilled bytes and shared memory of ``spec`` compiled for ``arch`` with ``options``."""
    compiled = compile_kernel(spec, arch, options)
    return *ptxas_usage(compiled.asm["ptx"], arch), compiled.metadata.shared


def table(specs: list[dict], arch: int, warps: list[int]) -> str:
    from mope.kernels.grid import FP_FUSION, stages_for

    stages = stages_for(SHARED_MEMORY[arch])
    rows = collections.defaultdict(lambda: {"variants": 0, **{w: [0, 0, 0, 0] for w in warps}})
    for spec in specs:
        dot = spec["constants"].get("DOT")
        row = rows[spec["kernel"], dot["dtype"] if isinstance(dot, dict) else "-"]
        row["variants"] += 1
        for w in warps:
            options = {"num_warps": w, "num_stages": stages, "enable_fp_fusion": FP_FUSION}
            registers, spilled, shared = compile_usage(spec, arch, options)
            cell = row[w]
            cell[0], cell[1] = max(cell[0], registers), cell[1] + (spilled > 0)
            cell[2], cell[3] = max(cell[2], spilled), max(cell[3], shared)
    head = "| kernel | `tl.dot` operands | variants | " + " | ".join(
        f"{w} warps: most registers, variants spilling, most spilled (B), most shared memory (B)" for w in warps
    )
    lines = [head + " |", "|---|---|---|" + "---|" * len(warps)]
    for (kernel, dot), row in sorted(rows.items()):
        cells = [" / ".join(str(v) for v in row[w]) for w in warps]
        lines.append(f"| {kernel} | {dot} | {row['variants']} | " + " | ".join(cells) + " |")
    spilling = ", ".join(f"{w} warps: {sum(r[w][1] for r in rows.values())} of {len(specs)} spill" for w in warps)
    title = f"# Triton kernels compiled for sm_{arch}, {stages} pipelining stages (variants the tests launch)"
    return f"{title}\n\n{provenance()}\n\n{spilling}.\n\n" + "\n".join(lines) + "\n"


def provenance() -> str:
    """Where the figures come from: the compiler's version and the mope commit (no GPU ran anything)."""
    import triton

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") + (
        " with uncommitted changes" if git("status", "--porcelain", "mope") else ""
    )
    return f"Triton {triton.__version__}'s compiler and ptxas on a CPU, mope at {commit}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY))
    parser.add_argument("--warps", default="4,8", help="comma-separated warp counts to compile with")
    parser.add_argument("--launches", type=Path, help="a recorded launches file (else the tests are run to record)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        launches = args.launches or Path(tmp) / "launches.json"
        if args.launches is None:
            record_launches(launches)
        specs = compile_set(json.loads(launches.read_text()))
    text = table(specs, args.arch, [int(w) for w in args.warps.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernel_resources_sm{args.arch}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
