"""Quickstart: wrap a tiny Llama with a mixture of LoRA experts, train, save, reload, compare.

Run:  python examples/quickstart.py [--out DIR] [--steps N]

Everything is built from configs, so it runs offline in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mope

# PEFT 0.21 calls a transformers property that transformers 5 deprecated; not ours to fix.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="bundle folder (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    cfg = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        num_experts=8,
        top_k=2,
        r=8,
        lora_alpha=16,
        router="top_k",
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    )
    model = get_peft_model(tiny_llama(), cfg)
    model.print_trainable_parameters()

    # Two "domains" with different token statistics, right-padded to one length.
    g = torch.Generator().manual_seed(1)
    low = torch.randint(1, 128, (4, 24), generator=g)
    high = torch.randint(128, 256, (4, 24), generator=g)
    input_ids = torch.cat([low, high])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, -6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(args.steps):
        out = model(**batch, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {out.loss.item():.4f}  aux_loss {out.aux_loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits

    out_dir = args.out or tempfile.mkdtemp(prefix="mope-quickstart-")
    mope.save_pretrained(model, out_dir)
    size = os.path.getsize(os.path.join(out_dir, "adapter_model.safetensors"))
    print(f"saved bundle to {out_dir} ({size / 1024:.1f} KiB): {sorted(os.listdir(out_dir))}")

    again = PeftModel.from_pretrained(tiny_llama(), out_dir)
    with torch.no_grad():
        reloaded = again(**batch).logits
    diff = (reloaded - logits).abs().max().item()
    print(f"reloaded bundle: max |logit difference| = {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("reloaded model does not reproduce the trained model")
    print("OK")


if __name__ == "__main__":
    main()
