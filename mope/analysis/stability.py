"""Routing stability between two checkpoints (OpenMoE's "early routing learning").

Run the same batches through two models that differ only in their MoPE weights (e.g. a bundle
after 10% and after 100% of training) and count, per router, the real tokens whose top-1 expert
agrees, and those whose top-k set agrees. OpenMoE found the token-to-expert assignment fixed
early in pre-training: agreement between an early and the final checkpoint stays high. Tokens
for which either router gave NaN/inf are counted in ``nonfinite_tokens``; if there are any, both
agreements are NaN (two NaN routers "agree" on expert 0 for every token).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .choices import record_choices


@torch.no_grad()
def routing_agreement(
    model_a: nn.Module, model_b: nn.Module, batches: Iterable[dict], adapter_name: str = "default"
) -> dict[str, dict[str, float | int]]:
    """Per module: ``top1_agreement`` and ``topk_agreement`` (shares of real tokens), ``tokens`` and ``nonfinite_tokens``.

    The models must have the same adapted modules (same base, same target modules) with as many experts each.
    Where their ``top_k`` differs (a dense-to-sparse schedule between the checkpoints), ``topk_agreement`` is NaN:
    sets of different sizes are never equal. Counts accumulate on the device; they are read once at the end.
    """
    with record_choices(model_a, adapter_name) as a, record_choices(model_b, adapter_name) as b:
        if set(a.collectors) != set(b.collectors):
            only = sorted(set(a.collectors) ^ set(b.collectors))
            raise ValueError(
                f"The two models route in different modules ({', '.join(only[:3])}): compare checkpoints of one adapter."
            )
        for name, first in a.collectors.items():  # expert e of one is not expert e of the other
            if first.num_experts != b.collectors[name].num_experts:
                raise ValueError(
                    f"Module {name!r} routes over {first.num_experts} experts in the first model and "
                    f"{b.collectors[name].num_experts} in the second: compare checkpoints of one adapter."
                )
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            model_a(**batch)
            model_b(**batch)
            for name, first in a.collectors.items():
                second = b.collectors[name]
                if first.top1 is None or second.top1 is None:
                    continue
                real = first.mask & second.mask
                same_top1 = (first.top1 == second.top1) & real
                tokens = real.sum().float()
                # different k: no count of equal sets means anything (it read 0.0, a believable figure)
                same_set = (
                    ((first.topk == second.topk).all(-1) & real).sum().float()
                    if first.k == second.k
                    else tokens * math.nan
                )
                nonfinite = real & ~(first.finite & second.finite)
                counts = torch.stack([same_top1.sum().float(), same_set, tokens, nonfinite.sum().float()])
                sums[name] = sums[name] + counts if name in sums else counts
    return {name: agreement(counts.tolist()) for name, counts in sums.items()}


def agreement(counts: list[float]) -> dict[str, float | int]:
    top1, topk, tokens, nonfinite = counts
    if nonfinite:
        top1 = topk = math.nan
    return {
        "top1_agreement": top1 / max(tokens, 1),
        "topk_agreement": topk / max(tokens, 1),
        "tokens": int(tokens),
        "nonfinite_tokens": int(nonfinite),
    }
