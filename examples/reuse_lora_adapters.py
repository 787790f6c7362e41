"""Reuse LoRA adapters: train two PEFT LoRAs on different "domains", mix them with Arrow, no further training.

Run:  python examples/reuse_lora_adapters.py [--out DIR] [--steps N]

Each LoRA learns one domain of a tiny random Llama (token ids 1-127 vs 128-255). mope turns the
two saved adapters into the two experts of one mixture whose Arrow router needs no training:
per token and layer it picks the adapter whose main input direction the token aligns with.
Runs offline in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from quickstart import tiny_llama  # examples/ is on the path when a script here runs
from transformers import LlamaForCausalLM

import mope
from mope.layer import MoPELayer

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def two_domain_llama() -> LlamaForCausalLM:
    """The quickstart's tiny random Llama, its two vocabulary halves marked by two embedding directions.

    Real domains differ in their hidden states; random embeddings alone would not.
    """
    model = tiny_llama()
    with torch.no_grad():
        u = torch.linalg.qr(torch.randn(64, 2, generator=torch.Generator().manual_seed(7)))[0].T
        model.model.embed_tokens.weight[1:128] += 0.5 * u[0]
        model.model.embed_tokens.weight[128:] += 0.5 * u[1]
    return model


def domain(low: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(low, high, (16, 24), generator=torch.Generator().manual_seed(seed))


def train_lora(data: torch.Tensor, rank: int, steps: int, folder: str) -> None:
    """A plain PEFT LoRA fitted to one domain, saved with PEFT's own save_pretrained."""
    model = get_peft_model(
        two_domain_llama(), LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


@torch.no_grad()
def loss(model, data: torch.Tensor) -> float:
    return model(input_ids=data, labels=data).loss.item()


@torch.no_grad()
def share_to_expert(model, data: torch.Tensor, expert: int) -> float:
    """Mean gate weight the Arrow routers give ``expert`` over the tokens and layers of ``data``."""
    shares = []
    hooks = [
        layer.mope_router["default"].register_forward_hook(
            lambda m, a, out: shares.append(out.weights[..., expert].mean())
        )
        for layer in model.modules()
        if isinstance(layer, MoPELayer)
    ]
    model(input_ids=data)
    for hook in hooks:
        hook.remove()
    return torch.stack(shares).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the two LoRAs and the mixture bundle")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mope-reuse-")

    train_low, train_high = domain(1, 128, seed=1), domain(128, 256, seed=2)
    test = {"low": domain(1, 128, seed=3), "high": domain(128, 256, seed=4)}
    paths = [os.path.join(out, "lora_low"), os.path.join(out, "lora_high")]
    train_lora(train_low, rank=4, steps=args.steps, folder=paths[0])
    train_lora(train_high, rank=8, steps=args.steps, folder=paths[1])  # different ranks: padded, exact

    mixture = mope.from_lora_adapters(two_domain_llama(), paths, mope.MoPEConfig(router="arrow", top_k=1))
    print(f"trainable parameters in the mixture: {sum(p.numel() for p in mixture.parameters() if p.requires_grad)}")
    singles = {
        name: PeftModel.from_pretrained(two_domain_llama(), path)
        for name, path in zip(("low", "high"), paths, strict=True)
    }
    base = two_domain_llama()
    print(f"{'test domain':12s} {'base':>7s} {'LoRA low':>9s} {'LoRA high':>9s} {'Arrow mix':>9s} {'to own LoRA':>12s}")
    problems = []
    for own, (name, data) in enumerate(test.items()):
        base_loss, low_loss, high_loss, mixed = (loss(m, data) for m in (base, *singles.values(), mixture))
        share = share_to_expert(mixture, data, own)
        print(f"{name:12s} {base_loss:7.3f} {low_loss:9.3f} {high_loss:9.3f} {mixed:9.3f} {share:12.2f}")
        wrong = (high_loss, low_loss)[own]
        if share < 0.75 or not mixed < min(base_loss, wrong):
            problems.append(f"{name}: Arrow sent {share:.0%} of the gate to its own LoRA, loss {mixed:.3f}")

    mixture_bundle = os.path.join(out, "mixture")
    mope.save_pretrained(mixture, mixture_bundle)
    again = PeftModel.from_pretrained(two_domain_llama(), mixture_bundle)
    with torch.no_grad():
        diff = max((again(input_ids=d).logits - mixture(input_ids=d).logits).abs().max().item() for d in test.values())
    print(f"reloaded mixture: max |logit difference| = {diff:.1e}")

    if problems:
        raise SystemExit("the untrained Arrow mixture did not route by domain: " + "; ".join(problems))
    if diff > 1e-5:
        raise SystemExit("the reloaded mixture routes differently")
    print("OK")


if __name__ == "__main__":
    main()
