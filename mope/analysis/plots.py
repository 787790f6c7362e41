"""Plots of routing reports: load heatmap, routing by position, token-to-expert map, domain x expert load.

Each function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state,
no screen: the Agg canvas renders it), so it shows in a notebook and saves with ``fig.savefig``.
The report arguments are what :func:`mope.analysis.routing_report` / ``routing_stats().report()`` return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..extras import require_extra
from .choices import token_choices
from .separation import Loads, checked_shares, module_separation

require_extra("plots", "matplotlib")
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PREFIX = "base_model.model."


def short_name(module: str) -> str:
    """Module name without PEFT's wrapper prefix (``model.layers.0.self_attn.q_proj``)."""
    return module.removeprefix(PREFIX)


def load_heatmap(report: Mapping[str, Mapping]) -> Figure:
    """Layers by experts, colour = share of dispatch; a balanced layer is one flat colour."""
    names = list(report)
    if not names:
        raise ValueError("load_heatmap: the report has no module (routing_report saw no batch, or no MoPE layer)")
    width = max(len(report[n]["load"]) for n in names)
    grid = np.full((len(names), width), np.nan)
    for row, name in enumerate(names):
        grid[row, : len(report[name]["load"])] = report[name]["load"]
    fig = Figure(figsize=(max(5.0, 2.8 + 0.45 * width), 1.2 + 0.32 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(width), [str(e) for e in range(width)])
    ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title("expert load: share of dispatch")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def domain_expert_load(loads: Loads, module: str | None = None, title: str | None = None) -> Figure:
    """Left: domains by experts, colour = share of dispatch; right: each module's domain separation.

    ``loads``: ``{domain: {module: [share per expert]}}``. The heatmap shows ``module``'s loads or,
    by default, the mean over modules (expert numbers of different modules are unrelated, so a
    flat mean can hide separation: the bars on the right show it per module). The bars are
    :func:`mope.analysis.separation.module_separation` (mean pairwise total-variation distance
    between the domains' loads: 0 same proportions, 1 disjoint experts), the dashed line their mean.
    """
    shares = checked_shares(loads)
    separation = module_separation(loads)
    domains, modules = list(shares), list(separation)
    if module is not None and module not in separation:
        raise ValueError(f"module {module!r} has no loads: pass one of {modules}")
    shown = [module] if module else modules
    widths = {len(shares[domains[0]][m]) for m in shown}
    if len(widths) > 1:
        raise ValueError(f"the modules have different numbers of experts {sorted(widths)}: pass module= to show one")
    grid = np.array([np.mean([shares[d][m] for m in shown], axis=0) for d in domains])
    width = grid.shape[1]
    fig = Figure(figsize=(7.0 + 0.5 * width, max(3.0, 1.0 + 0.16 * len(modules))), layout="constrained")
    heat, bars = fig.subplots(1, 2, width_ratios=[max(2.0, 0.5 * width), 3.0])
    image = heat.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for (row, column), value in np.ndenumerate(grid):
        colour = "black" if value > 0.6 * grid.max() else "white"
        heat.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
    heat.set_xticks(range(width), [str(e) for e in range(width)])
    heat.set_yticks(range(len(domains)), domains)
    heat.set_xlabel("expert")
    where = short_name(module) if module else f"mean over {len(modules)} modules"
    heat.set_title(f"share of dispatch per domain\n({where})", fontsize=9)
    fig.colorbar(image, ax=heat, shrink=0.8)
    values = [separation[m] for m in modules]
    mean = float(np.mean(values))
    bars.barh(range(len(modules)), values, color="tab:blue")
    bars.axvline(mean, color="black", linestyle="--", linewidth=1)
    bars.set_yticks(range(len(modules)), [short_name(m) for m in modules], fontsize=6)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_xlabel("mean pairwise TV distance of the loads")
    bars.set_title(f"domain separation per module\n(mean {mean:.3f})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def routing_by_position(report: Mapping[str, Mapping], module: str | None = None) -> Figure:
    """Left: drop rate by position, one line per layer (OpenMoE's drop towards the end).
    Right: each expert's share of dispatch by position for ``module`` (default: the first layer)."""
    if not report:
        raise ValueError(
            "routing_by_position: the report has no module (routing_report saw no batch, or no MoPE layer)"
        )
    module = module or next(iter(report))
    if module not in report:
        raise ValueError(f"routing_by_position: module {module!r} is not in the report: pass one of {list(report)}")
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    drops, shares = fig.subplots(1, 2)
    lines = [(n, s["drop_rate_by_position"]) for n, s in report.items() if s.get("drop_rate_by_position")]
    for name, rates in lines:
        drops.plot(rates, label=short_name(name), linewidth=1)
    if lines and len(lines) <= 8:
        drops.legend(fontsize=6)
    if not lines:
        drops.text(
            0.5,
            0.5,
            "no drops recorded (no capacity limit,\nor a causal model outside training)",
            ha="center",
            va="center",
            transform=drops.transAxes,
        )
    drops.set(xlabel="position", ylabel="drop rate")
    drops.set_title("dropped assignments by position", fontsize=9)
    by_position = np.asarray(report[module].get("load_by_position") or [[]])
    if by_position.size:
        positions = np.arange(by_position.shape[0])
        shares.stackplot(positions, by_position.T, labels=[f"expert {e}" for e in range(by_position.shape[1])])
        shares.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        shares.set_xlim(0, max(positions[-1], 1))
        shares.set_ylim(0, 1)
    shares.set(xlabel="position", ylabel="share of dispatch")
    shares.set_title(f"experts by position\n{short_name(module)}", fontsize=9)
    return fig


def token_map(tokens: Sequence[str], choices: Mapping[str, torch.Tensor], num_experts: int | None = None) -> Figure:
    """Tokens by layers, colour = each token's top-1 expert (``choices``: module -> ``[seq]`` expert ids)."""
    names = list(choices)
    if not names or not len(tokens):
        raise ValueError(
            f"token_map needs tokens and the choices of at least one module; got {len(tokens)} tokens, {len(names)} modules"
        )
    grid = np.stack([np.asarray(choices[n]).reshape(-1)[: len(tokens)] for n in names])
    num_experts = num_experts or int(grid.max()) + 1
    fig = Figure(figsize=(1.8 + 0.34 * len(tokens), 1.0 + 0.3 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    palette = colormaps["tab10" if num_experts <= 10 else "tab20"].colors  # one distinct colour per expert
    cmap = ListedColormap([palette[e % len(palette)] for e in range(num_experts)])
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, interpolation="nearest")
    ax.set_xticks(range(len(tokens)), list(tokens), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=7)
    ax.set_title("top-1 expert per token")
    bar = fig.colorbar(image, ax=ax, ticks=range(num_experts), shrink=0.8)
    bar.set_label("expert")
    return fig


def text_token_map(
    model: nn.Module,
    tokenizer,
    text: str,
    adapter_name: str = "default",
    max_tokens: int = 48,
    only: str | None = None,
) -> Figure:
    """:func:`token_map` for one text (its first ``max_tokens`` tokens): run the model once, plot top-1 experts.

    ``only``: keep modules whose name contains it (e.g. ``"query"``). Modules that see no
    per-token states (e.g. BERT's pooler, fed the first token only) are left out.
    """
    batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_tokens)
    device = next(model.parameters()).device
    choices = token_choices(model, {k: v.to(device) for k, v in batch.items()}, adapter_name)
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    per_token = {
        n: c[0] for n, c in choices.items() if tuple(c.shape) == (1, len(tokens)) and (only is None or only in n)
    }
    if not per_token:
        hint = f"whose name contains {only!r} " if only is not None else ""
        raise ValueError(f"text_token_map: no MoPE module {hint}routes per token here; seen: {sorted(choices)}")
    modules = dict(model.named_modules())
    num_experts = max((modules[n].mope_router[adapter_name].num_experts for n in per_token), default=None)
    return token_map(tokens, per_token, num_experts)
