"""What the host computes around a launch: grid and tile arithmetic in plain Python, flat views of tensors, the
launch options (warps, pipelining stages) the GPU's shared memory allows, the device the kernels launch on, and
the refusal of second-order gradients, which the kernels' backward does not give.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in Triton 3.x: about 2.6 us a
call outside a kernel, several per launch, every step.
"""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``a >= 0``, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1``."""
    return 1 << (n - 1).bit_length()


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous ``[T, t.shape[-1]]`` tensor: a view where ``t`` is contiguous (``reshape`` takes the
    host about twice a ``view``'s time, 1.8 against 0.9 us here), else a copy."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1]).contiguous()


# a block's shared memory (bytes) from which Triton's default 3 pipelining stages fit every kernel (their largest
# need: 160 KB at 3 stages on sm_90, 80 KB at 2 on sm_89, as tests/kernel_specs.py compiles them), and 2 stages
STAGES_3_FROM, STAGES_2_FROM = 160 * 1024, 96 * 1024


def stages_for(shared_bytes: int) -> int:
    """Pipelining stages of the kernels' loops on a GPU whose blocks may take ``shared_bytes`` of shared memory:
    Triton's default, 3, on A100/H100-class GPUs (164 KB and more), 2 on those with 99 KB (sm_86, sm_89, sm_120:
    RTX 30/40/50 series, A10, L4, L40), else 1. Triton refuses a launch that needs more than the GPU has."""
    return 3 if shared_bytes >= STAGES_3_FROM else 2 if shared_bytes >= STAGES_2_FROM else 1


# warps per program, not Triton's default 4: compiled for sm_90 (benchmarks/kernel_resources.py), with 4 warps the fp32
# tl.dot tiles took all 255 registers a thread may hold and spilled in 52 of the 132 variants the tests launch (up to
# 56 KB a thread in grouped_gradients); with 8, 24 spill, at most 2.9 KB. Not yet timed on a GPU.
WARPS = 8


# floating-point contraction (a * b + c as one fma) on, said at each launch: Triton's default up to 3.9, which the
# compile checks and the lent GPUs' Triton 3.6 use; 3.9 warns where it is left unset, and 3.10 turns it off.
FP_FUSION = True


def options_for(shared_bytes: int) -> dict:
    """The launch options on a GPU whose blocks may take ``shared_bytes`` of shared memory: ``WARPS`` warps,
    ``FP_FUSION``, and ``num_stages`` where Triton's default 3 does not fit (:func:`stages_for`)."""
    stages = stages_for(shared_bytes)
    options = {"num_warps": WARPS, "enable_fp_fusion": FP_FUSION}
    return options if stages == 3 else {**options, "num_stages": stages}


@functools.cache
def launch_options() -> dict:
    """Each launch's keyword options, by the smallest visible GPU (:func:`options_for`); none on CPU (the
    interpreter runs one thread a program whatever they say)."""
    if not torch.cuda.is_available():
        return {}
    return options_for(
        min(shared_memory(torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count()))
    )


def shared_memory(properties) -> int:
    """A block's most shared memory on a GPU (its opt-in maximum; ROCm's properties lack that, so its default)."""
    return getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)


def on_inputs_device(fn):
    """``fn(x, ...)``, a kernel entry, with the current CUDA device set to ``x``'s where it is another.

    Triton launches a kernel on the current CUDA device and its current stream, not on its tensors' device. With a
    model split over GPUs in one process (``device_map="auto"``), a layer on cuda:1 would otherwise launch on
    cuda:0 with cuda:1's memory: an error, or without one a kernel racing cuda:1's stream. The backward needs no
    guard: autograd runs a CUDA tensor's backward on its device's thread and the forward's stream.
    """

    @functools.wraps(fn)
    def on_device(x: torch.Tensor, *args, **kwargs):
        index = launch_device(x.device) if several_gpus() else None  # one GPU: x.device is not even read
        if index is None:
            return fn(x, *args, **kwargs)
        with torch.cuda.device(index):
            return fn(x, *args, **kwargs)

    return on_device


def launch_device(device: torch.device) -> int | None:
    """The CUDA device to make current before launching kernels on ``device``'s tensors, or None where there is
    nothing to change (one GPU, the current one, not CUDA, or compiling: inductor guards its graph's device)."""
    if device.type != "cuda" or not several_gpus() or torch.compiler.is_compiling():
        return None
    return None if device.index is None or device.index == torch.cuda.current_device() else device.index


gpu_count: list[int] = []  # torch.cuda.device_count(), read at the first call of several_gpus


@torch.compiler.assume_constant_result  # Dynamo takes its value (device_count() is not traceable)
def several_gpus() -> bool:
    """Whether this process sees more than one GPU (``device_count`` creates no CUDA context). Not a
    ``functools.cache``: Dynamo would warn at each compiled call that it ignores the cache."""
    if not gpu_count:
        gpu_count.append(torch.cuda.device_count())
    return gpu_count[0] > 1


def first_order_only(backward):
    """An autograd Function's ``backward`` that refuses ``create_graph=True`` (autograd then runs it with grad
    enabled): the kernels compute no graph of their own, so a second-order gradient would treat their share as a
    constant. Refused at the first backward, not by ``once_differentiable``, whose error is only raised where the
    second backward runs its node: ``torch.autograd.grad(penalty, [params])`` skips that node, and the kernels'
    share of a gradient penalty's gradient was silently missing (1/25 of masked's in a test)."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "dispatch='triton' gives no second-order gradients (create_graph=True): its kernels' backward is "
                "not differentiable; use dispatch='masked' where a gradient is differentiated again"
            )
        return backward(ctx, *grads)

    return checked
