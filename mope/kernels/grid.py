"""Grid and tile arithmetic on the host, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in Triton 3.x: about 2.6 us a
call outside a kernel, several per launch, every step.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``a >= 0``, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1``."""
    return 1 << (n - 1).bit_length()
