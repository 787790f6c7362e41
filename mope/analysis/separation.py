"""Does expert load separate by domain? One number per module, and their mean (issue 18's routing analysis).

``loads`` maps each domain to ``{module: load}``, a module's load being its experts' shares of
dispatch on that domain's data (what :func:`mope.analysis.expert_load` reports as ``share``).

The separation of a module is the **mean total-variation distance between the domains' load
vectors**, over all unordered pairs of domains: ``TV(p, q) = 1/2 * sum_e |p_e - q_e|``, each vector
first divided by its sum. It is 0 when every domain uses the experts in the same proportions
(routing ignores the domain) and 1 when every two domains use disjoint sets of experts. The
separation of a model is the mean over its modules.

Why this figure: it stays in [0, 1] whatever the numbers of experts and domains, weighs every
domain the same whatever its size (as the study's macro accuracy does), and needs no logarithm of
zero shares (mutual information would). It does not depend on how experts are numbered, so it can
be averaged over seeds, whose expert numbers mean nothing to each other, while their loads cannot.
It is computed per module and then averaged, because averaging the loads over modules first would
mix experts that share only a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

Loads = Mapping[str, Mapping[str, Sequence[float]]]


def module_separation(loads: Loads) -> dict[str, float]:
    """Per module: the mean total-variation distance between the domains' load vectors (0 same, 1 disjoint)."""
    shares = checked_shares(loads)
    domains = list(shares)
    pairs = list(combinations(domains, 2))
    return {
        module: sum(total_variation(shares[a][module], shares[b][module]) for a, b in pairs) / len(pairs)
        for module in shares[domains[0]]
    }


def load_separation(loads: Loads) -> float:
    """The mean over modules of :func:`module_separation`: the study table's domain-separation figure."""
    per_module = module_separation(loads)
    return sum(per_module.values()) / len(per_module)


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def checked_shares(loads: Loads) -> dict[str, dict[str, list[float]]]:
    """``loads`` with every vector divided by its sum; a ValueError naming the domain and module if it cannot be."""
    if not isinstance(loads, Mapping) or len(loads) < 2:
        found = list(loads) if isinstance(loads, Mapping) else type(loads).__name__
        raise ValueError(
            f"domain separation needs the loads of at least two domains ({{domain: {{module: load}}}}); got {found}"
        )
    domains = list(loads)
    first = domains[0]
    if not isinstance(loads[first], Mapping) or not loads[first]:
        raise ValueError(f"domain {first!r} has no modules' loads: pass {{module: [share per expert]}} for it")
    modules = list(loads[first])
    shares: dict[str, dict[str, list[float]]] = {}
    for domain in domains:
        mine = loads[domain]
        if not isinstance(mine, Mapping) or set(mine) != set(modules):
            got = set(mine) if isinstance(mine, Mapping) else set()
            raise ValueError(
                f"domain {domain!r} has loads for other modules than domain {first!r} "
                f"(missing {sorted(set(modules) - got)}, extra {sorted(got - set(modules))}): "
                "every domain needs the same modules"
            )
        shares[domain] = {}
        for module in modules:
            given = mine[module]
            if isinstance(given, (str, bytes)) or any(isinstance(x, bool) for x in given):  # "12" read as [1, 2]
                raise ValueError(
                    f"the load of module {module!r} for domain {domain!r} is not a set of shares (numbers): {given!r}"
                )
            load = [float(x) for x in given]
            if len(load) != len(loads[first][module]):
                raise ValueError(
                    f"module {module!r} has {len(load)} experts' loads for domain {domain!r} but "
                    f"{len(loads[first][module])} for {first!r}: the domains must come from the same model"
                )
            total = sum(load)
            if not all(math.isfinite(x) and x >= 0 for x in load) or total <= 0:
                raise ValueError(
                    f"the load of module {module!r} for domain {domain!r} is not a set of shares "
                    f"(finite, non-negative, not all zero): {load}"
                )
            shares[domain][module] = [x / total for x in load]
    return shares
