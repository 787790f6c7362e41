"""Plot what the routers do: load heatmap, routing by position, token-to-expert map (PNG files).

Run:  python examples/plot_routing.py [--out DIR] [--steps N]

Trains a top-2-of-8 mixture on a tiny random Llama (offline, seconds on a CPU) with two token
"domains", then writes ``load_heatmap.png``, ``routing_by_position.png`` and ``token_map.png``
into ``--out`` with mope's plot functions (``mope.analysis.plots``; each returns a matplotlib
Figure, so the same calls show inline in a notebook). ``mope stats`` writes the same plots for
a saved bundle.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mope
from mope.analysis import routing_report, token_choices
from mope.analysis.plots import load_heatmap, routing_by_position, token_map

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the PNG files (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mope-plots-")
    os.makedirs(out, exist_ok=True)

    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], num_experts=8, top_k=2, r=4
    )
    model = get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 128, (4, 24), generator=g), torch.randint(128, 256, (4, 24), generator=g)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(args.steps):
        model(**batch, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.eval()
    with torch.no_grad():
        report = routing_report(model, [batch])
        choices = token_choices(model, {k: v[:1] for k, v in batch.items()})
    for name, stats in list(report.items())[:3]:
        print(f"{name.removeprefix('base_model.model.')}: load {[round(x, 2) for x in stats['load']]}")
    tokens = [f"t{i}" for i in ids[0, :16].tolist()]
    figures = {
        "load_heatmap.png": load_heatmap(report),
        "routing_by_position.png": routing_by_position(report),
        "token_map.png": token_map(tokens, {name: c[0] for name, c in choices.items()}, num_experts=8),
    }
    for filename, figure in figures.items():
        path = os.path.join(out, filename)
        figure.savefig(path, dpi=80)
        assert os.path.getsize(path) > 1000, path
        print("wrote", path)
    for stats in report.values():
        assert abs(sum(stats["load"]) - 1) < 1e-4  # each layer's dispatch shares sum to one


if __name__ == "__main__":
    main()
