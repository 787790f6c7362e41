"""Triton kernels for the expert path (an optional dependency: ``pip install 'mope[triton]'``).

Nothing here imports Triton until a kernel strategy is first resolved: ``import mope`` stays free
of it, :func:`triton_missing` imports nothing, and :func:`triton_unavailable` imports the kernels
only when Triton is installed (they are about to run). The kernels live in :mod:`mope.kernels.lora`
(the LoRA experts), :mod:`mope.kernels.grouped` (only the chosen experts) and :mod:`mope.kernels.router`
(the top-k router); :mod:`mope.kernels.layer` calls the router's and the experts' in one autograd Function,
and :mod:`mope.kernels.decode` does a few tokens' router and chosen experts in one kernel (no gradient).

Triton decides once, when it compiles (decorates) a kernel, whether to run it on a GPU or in its
CPU interpreter: the interpreter is chosen by ``TRITON_INTERPRET=1`` in the environment *before*
:mod:`mope.kernels.lora` is imported. So a CPU tensor can use the kernels only in a process that
set it that early; a CUDA tensor only when they were compiled for the GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

INSTALL_HINT = "pip install 'mope[triton]' (Triton ships with CUDA builds of torch)"
# The router kernel holds a token's N logits in one tile; past this many experts its tiles (and the router's weight
# gradient's) outgrow a GPU block's shared memory (at 256: 160 KB at 3 pipelining stages, which an A100 and an H100
# take, checked by compiling for them), so there the router scores in torch and the experts' kernels run alone.
ROUTER_KERNEL_MAX_EXPERTS = 256
# Triton supports NVIDIA GPUs of compute capability 8.0 and newer (its README; older ones "may work at times"). Compiled
# for sm_75 (T4) here, 3 of the tests' launches need 80 KB of shared memory, more than its blocks' 64 KB.
MIN_CAPABILITY = (8, 0)


def kernels_interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter.

    Triton decides when :mod:`mope.kernels.lora` is imported, so that is imported here (it is about
    to be used). Reading ``sys.modules`` instead would change its answer in the middle of a
    ``torch.compile`` trace that imports the kernels, which Dynamo refuses.
    """
    if triton_import_problem() is not None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    from . import lora

    return lora.INTERPRETED


def triton_missing() -> str | None:
    """Why the kernels cannot run on any device (Triton not installed), or None; imports nothing."""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed: {INSTALL_HINT}"
    return None


@functools.cache
def triton_broken() -> str | None:
    """Why an installed Triton cannot run the kernels (importing it or them fails: a build that does not match
    this torch or Python), or None. Imports the kernels: call it only where they are about to run."""
    try:
        from . import lora  # noqa: F401
    except ImportError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"Triton is installed but does not import ({first}): reinstall it, {INSTALL_HINT}"
    return None


def triton_import_problem() -> str | None:
    """Why Triton or the kernels cannot be imported (not installed, or installed but broken), or None."""
    return triton_missing() or triton_broken()


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors on ``device``, or None when they can."""
    missing = triton_import_problem()
    if missing is not None:
        return missing
    if device.type == "cuda":
        if kernels_interpreted():
            return (
                "this process set TRITON_INTERPRET=1, so the kernels run in Triton's CPU interpreter, "
                "not on CUDA tensors; unset it to use them on the GPU"
            )
        return gpu_too_old(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        if kernels_interpreted():
            from . import lora

            return lora.INTERPRETER_FAULT
        return (
            "Triton kernels run on CUDA; on CPU only under Triton's interpreter (set TRITON_INTERPRET=1 "
            "before triton is imported, a testing aid, far slower than the torch strategies)"
        )
    return f"the Triton kernels run on CUDA (or on CPU under TRITON_INTERPRET=1), not on {device.type!r} tensors"


@functools.cache
def gpu_too_old(index: int) -> str | None:
    """Why the kernels cannot run on CUDA GPU ``index`` (an NVIDIA GPU older than :data:`MIN_CAPABILITY`), or None.
    ROCm GPUs are not refused here."""
    if torch.version.hip is not None:
        return None
    capability = torch.cuda.get_device_capability(index)
    if capability >= MIN_CAPABILITY:
        return None
    return (
        f"the kernels need an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
        f"(Ampere and later: A100, A10, L4, RTX 30 series and newer), as Triton does; cuda:{index} "
        f"({torch.cuda.get_device_name(index)}) has {capability[0]}.{capability[1]}"
    )
