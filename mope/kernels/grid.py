"""What the host computes around a launch: grid and tile arithmetic in plain Python, flat views of tensors.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in Triton 3.x: about 2.6 us a
call outside a kernel, several per launch, every step.
"""

from __future__ import annotations

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
