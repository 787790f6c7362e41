"""The Triton kernels' launches as specialisations, and compiling them for a GPU on a machine without one.

Under ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter, which checks neither what
``tl.dot`` accepts on a GPU nor what the compiler can lower. :func:`recorded_launches` writes down
each distinct launch (the kernel, its arguments' types, its constexpr values) while a test battery
runs; :func:`compile_spec`, in a process without the interpreter, compiles one with Triton's own
compiler down to a cubin for a given GPU (``ptxas`` ships with Triton), which needs no GPU.

On a GPU the kernels pick ``tl.dot`` operands the interpreter never does (bf16): :func:`compile_set`
adds them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
from pathlib import Path

import torch

POINTER_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}


def constexpr_names(fn) -> set[str]:
    """The parameters annotated ``tl.constexpr`` (strings, under ``from __future__ import annotations``)."""
    return {p.name for p in inspect.signature(fn).parameters.values() if str(p.annotation).endswith("constexpr")}


def launch_spec(fn, args: tuple, kwargs: dict) -> dict:
    """One launch of ``fn`` (the kernel's Python function) as JSON: argument types and constexpr values."""
    names = list(inspect.signature(fn).parameters)
    values = dict(zip(names, args, strict=False)) | {name: kwargs[name] for name in names if name in kwargs}
    constexprs = constexpr_names(fn)
    signature, constants = {}, {}
    for name in names:
        value = values[name]
        if name in constexprs:
            signature[name] = "constexpr"
            constants[name] = {"dtype": str(value)} if not isinstance(value, bool | int | float | str) else value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constants": constants}


@contextlib.contextmanager
def recorded_launches(path: Path):
    """While inside, every interpreted Triton launch is recorded; the distinct ones are written to ``path``."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    seen: dict[str, dict] = {}

    def run(self, *args, **kwargs):
        spec = launch_spec(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        seen.setdefault(json.dumps(spec, sort_keys=True), spec)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original
        Path(path).write_text(json.dumps(list(seen.values()), indent=1))


def compile_set(specs: list[dict]) -> list[dict]:
    """One launch per kernel and constexpr values (argument types rarely change what compiles), and where
    ``tl.dot`` runs on fp32 operands, bf16 operands as a GPU gives bf16 experts (the interpreter never does):
    once per kernel and set of flags (tile sizes are the fp32 launches')."""
    distinct, flagged = {}, {}
    for spec in specs:
        constants = spec["constants"]
        distinct.setdefault((spec["kernel"], json.dumps(constants, sort_keys=True)), spec)
        if "DOT" in constants:
            flags = {name: value for name, value in constants.items() if isinstance(value, bool)}
            flagged.setdefault((spec["kernel"], json.dumps(flags, sort_keys=True)), spec)
    bf16 = {"DOT": {"dtype": "bf16"}, "PRECISION": "ieee"}
    return [*distinct.values(), *({**s, "constants": {**s["constants"], **bf16}} for s in flagged.values())]


def launched_kernels(modules: list[str]) -> set[str]:
    """The kernels of ``modules`` that are launched, not called from another kernel (device functions)."""
    from triton.runtime.jit import JITFunction

    kernels = {}
    for module in modules:
        for name, value in vars(importlib.import_module(module)).items():
            if isinstance(value, JITFunction):
                kernels[name] = value
    called = {name for name in kernels for other in kernels.values() if re.search(rf"(?<!def )\b{name}\(", other.src)}
    return set(kernels) - called


# a block's most shared memory (opt-in, bytes) by compute capability: H100, A100, and sm_86/sm_89/sm_120 (A10, L4,
# RTX 30, 40 and 50 series)
SHARED_MEMORY = {90: 232448, 80: 166912, 86: 101376, 89: 101376, 120: 101376}


def compile_spec(spec: dict, arch: int, options: dict | None = None) -> tuple[int, int]:
    """Compile ``spec`` for CUDA compute capability ``arch`` (90: H100; 89: L4, RTX 40 series) with launch
    ``options`` (``num_warps``, ``num_stages``; default: Triton's); the cubin's size and the shared memory a block
    needs, in bytes."""
    compiled = compile_kernel(spec, arch, options)
    return len(compiled.asm["cubin"]), compiled.metadata.shared


def compile_kernel(spec: dict, arch: int, options: dict | None = None):
    """``spec`` compiled by Triton for ``arch`` with launch ``options``: its ``CompiledKernel`` (no GPU needed)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constants = {
        name: tl.dtype(value["dtype"]) if isinstance(value, dict) else value
        for name, value in spec["constants"].items()
    }
    source = ASTSource(fn=kernel, signature=spec["signature"], constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options or {})


# one small launch (no floating point, compiles in about a second): for tests of the compiling itself
SMALL_SPEC = {
    "module": "mope.kernels.grouped", "kernel": "count_pairs",
    "signature": {"chosen_ptr": "*i64", "counts_ptr": "*i32", "pairs": "i32", "num_experts": "i32",
                  "BP": "constexpr", "NP": "constexpr"},
    "constants": {"BP": 256, "NP": 32},
}  # fmt: skip


def largest(specs: list[dict], shared: list[int]) -> list[dict]:
    """Of each kernel's specs (and ``tl.dot`` operand type), the one whose block needs the most shared memory."""
    most = {}
    for spec, need in zip(specs, shared, strict=True):
        key = spec["kernel"], json.dumps(spec["constants"].get("DOT"))
        if need >= most.get(key, (-1, None))[0]:
            most[key] = need, spec
    return [spec for _, spec in most.values()]
