"""Expert capacity for token-choice gates: which (token, expert) assignments fit, decided on device.

    capacity = ceil(capacity_factor * T * k / N)

with T the non-padding tokens of the batch at this layer, k the experts each token asks for
and N the routed experts. Assignments are served slot-major, as in GShard: every token's first
choice before any token's second choice; within a slot, tokens come in the policy's order
(``CAPACITY_POLICIES``): 'sequence' serves earlier positions first across the batch (position 0
of every row, then position 1, ...), 'bpr' the tokens with the highest top-1 probability first,
'random_second' first draws GShard's second expert, then serves as 'sequence'. An assignment is kept when fewer than ``capacity`` earlier assignments went to its
expert. One cumsum over a one-hot ``[N, k*T]`` gives these positions: no Python loop over
tokens, and T stays a tensor, so there is no host sync.

A dropped assignment gets weight 0 (the token passes through the base model unchanged for that
expert); the surviving weights are *not* renormalised, so a token that lost one of two experts
keeps the other one's original weight. Padding tokens neither take capacity nor get dropped:
their routing is left as the gate chose it (their outputs are ignored downstream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from ..checks import check_choice, check_number


def expert_capacity(factor: float, num_tokens: torch.Tensor, k: int, num_experts: int) -> torch.Tensor:
    """``ceil(factor * T * k / N)`` as a float 0-d tensor (T is a tensor: no host sync).

    Exact, in integers: ``factor`` is taken as the decimal it is written as (1.2 = 6/5). In floating point
    ``1.2 * 25 * 2 / 2`` lands just above 30 and its ceiling is 31.
    """
    ratio = Fraction(str(factor))
    numerator, denominator = ratio.numerator * k, ratio.denominator * num_experts
    return ((num_tokens.long() * numerator + denominator - 1) // denominator).float()


def may_drop(factor: float, k: int, num_experts: int) -> bool:
    """Whether capacity ``ceil(factor * T * k / N)`` can fall below T, leaving a token without an expert it chose
    (or, for expert choice with ``k = 1``, unchosen): not when ``factor * k >= N``, whatever the batch."""
    return Fraction(str(factor)) * k < num_experts


def position_order(priority: torch.Tensor) -> torch.Tensor:
    """'sequence': earlier positions first, across the batch (position 0 of every row, then position 1, ...).

    ``priority`` is shaped like the token dims (``[batch, seq]``); returns a permutation of the
    flattened tokens. Position-major rather than row-major, so that the last row of a batch
    does not lose all its tokens and drops fall on late positions (OpenMoE's observation).
    """
    flat = torch.arange(priority.numel(), device=priority.device).reshape(priority.shape)
    return flat.movedim(-1, 0).reshape(-1) if priority.dim() > 1 else flat


def priority_order(priority: torch.Tensor) -> torch.Tensor:
    """'bpr' (Riquelme et al. 2021): highest top-1 probability first; ties in 'sequence' order."""
    by_position = position_order(priority)
    return by_position[torch.argsort(priority.reshape(-1)[by_position], descending=True, stable=True)]


def all_assignments(values: torch.Tensor, training: bool) -> torch.Tensor:
    return torch.ones_like(values, dtype=torch.bool)


def random_second(values: torch.Tensor, training: bool) -> torch.Tensor:
    """GShard: slot s >= 2 competes with probability ``min(1, k * w_s / sum w)`` (k = 2: ``2 * g2``).

    Training only; in eval every chosen expert competes (then the policy equals 'sequence').
    """
    if not training:
        return all_assignments(values, training)
    k = values.shape[-1]
    share = values / values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    first = torch.arange(k, device=values.device) == 0
    return (k * share > torch.rand_like(share)) | first


@dataclass(frozen=True)
class CapacityPolicy:
    """Overflow policy: the order tokens are served in, and which assignments compete at all."""

    order: Callable[[torch.Tensor], torch.Tensor]
    candidates: Callable[[torch.Tensor, bool], torch.Tensor]


CAPACITY_POLICIES: dict[str, CapacityPolicy] = {
    "sequence": CapacityPolicy(position_order, all_assignments),
    "bpr": CapacityPolicy(priority_order, all_assignments),
    "random_second": CapacityPolicy(position_order, random_second),
}


MAX_CAPACITY_FACTOR = 1e6


def check_capacity_options(config: Any, routers: dict[str, Any]) -> None:
    """``capacity_policy`` and ``capacity_factor``, shared by the gates with ``accepts_capacity`` (top_k, switch,
    expert_choice and their subclasses); a factor is refused for a gate that would ignore it."""
    check_choice("MoPEConfig", "capacity_policy", config.capacity_policy, CAPACITY_POLICIES)
    # at most MAX_CAPACITY_FACTOR: the exact ceiling's integers fit int64 (factor * N / k >= 1 never drops anyway)
    factor = check_number(
        "MoPEConfig", "capacity_factor", config.capacity_factor, low=0, high=MAX_CAPACITY_FACTOR, low_open=True,
        optional=True,
    )  # fmt: skip
    if factor is not None and not routers[config.router].accepts_capacity:
        raise ValueError(
            f"MoPEConfig.capacity_factor is set but router={config.router!r} has no expert capacity; "
            f"gates with capacity: {sorted(name for name, cls in routers.items() if cls.accepts_capacity)}"
        )


def fit_to_capacity(
    index: torch.Tensor, compete: torch.Tensor, order: torch.Tensor, capacity: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Which of ``index [T, k]``'s competing assignments fit, serving slot-major in ``order``.

    ``compete [T, k]`` (bool) marks the assignments that ask for a place; ``order`` is a token
    permutation. Returns kept ``[T, k]`` (bool, False where not competing).
    """
    index, compete = index[order], compete[order]
    k = index.shape[-1]
    flat_index = index.t().reshape(-1)  # slot-major: [slot 0 of every token, slot 1 of every token, ...]
    flat_compete = compete.t().reshape(-1)
    # [N, k*T] so that the scan runs along the contiguous last dim (a scan over dim 0 of [k*T, N]
    # runs one serial thread per expert on CUDA: 20x slower at T = 16k)
    experts = torch.arange(num_experts, device=index.device).unsqueeze(-1)
    one_hot = ((flat_index.unsqueeze(0) == experts) & flat_compete.unsqueeze(0)).to(torch.int32)
    position = (one_hot.cumsum(dim=-1) - 1).gather(0, flat_index.unsqueeze(0)).squeeze(0)
    kept = (flat_compete & (position < capacity)).reshape(k, -1).t()
    unsorted = torch.empty_like(kept)
    unsorted[order] = kept
    return unsorted


def apply_capacity(
    index: torch.Tensor,
    values: torch.Tensor,
    priority: torch.Tensor,
    token_mask: torch.Tensor | None,
    factor: float,
    policy: str,
    num_experts: int,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity for a token-choice gate: ``(kept, dropped)``, both bool shaped like ``index [..., k]``.

    ``values``: the chosen experts' gate weights (slot 0 = best); ``priority``: ``[...]`` score of
    each token for 'bpr'. Padding (``token_mask == 0``) is kept and never competes.
    """
    lead, k = index.shape[:-1], index.shape[-1]
    index, values = index.reshape(-1, k), values.reshape(-1, k)
    if token_mask is None:
        real = torch.ones(index.shape[0], dtype=torch.bool, device=index.device)
    else:
        real = token_mask.reshape(-1).to(device=index.device, dtype=torch.bool)
    rule = CAPACITY_POLICIES[policy]
    compete = rule.candidates(values.detach(), training) & real.unsqueeze(-1)
    capacity = expert_capacity(factor, real.sum(), k, num_experts)
    kept = fit_to_capacity(index, compete, rule.order(priority.detach()), capacity, num_experts)
    dropped = compete & ~kept
    kept = kept | ~real.unsqueeze(-1)
    return kept.reshape(*lead, k), dropped.reshape(*lead, k)


def drop_rate_by_position(routing, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of requested (token, expert) assignments dropped at each sequence position, ``[seq]``, on device.

    Requested = kept (non-zero weight) or dropped; randomly skipped 'random_second' slots are
    not requested. Padding (``mask == 0``) is left out; a position with nothing requested reads 0.
    Expects ``routing.weights`` shaped ``[batch, seq, N]``; a gate without capacity reads all 0.
    """
    weights = routing.weights
    if routing.dropped is None:
        return weights.new_zeros(weights.shape[-2])
    dropped = routing.dropped.float().sum(dim=-1)
    requested = ((weights != 0) | routing.dropped).float().sum(dim=-1)
    if mask is not None:
        real = mask.to(device=weights.device, dtype=weights.dtype)
        dropped, requested = dropped * real, requested * real
    return dropped.sum(dim=0) / requested.sum(dim=0).clamp_min(1.0)
