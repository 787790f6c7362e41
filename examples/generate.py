"""Generate with a mixture: KV-cached greedy decoding, token-level and sequence-level routing, a merged deployment.

Run:  python examples/generate.py [--out DIR]

A tiny random Llama built from a config (offline, seconds on a CPU). It shows that

- ``generate`` with the KV cache gives the same tokens as without it: token-level gates route each
  new token once; sequence-level routing keeps the prompt's decision for every new token;
- a task-level mixture pinned to one task (``mope.fix_task``) folds into the base weights with
  ``merge_and_unload`` and then generates exactly what the unmerged mixture generates for that task.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mope

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def mixture(**settings) -> torch.nn.Module:
    """Random (init_weights=False) experts so the adapter visibly changes what the model says."""
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", num_experts=8, top_k=2, r=8, init_weights=False, **settings
    )
    return get_peft_model(tiny_llama(), config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="unused (every example takes it)")
    parser.parse_args()

    # two prompts of different lengths, left-padded as for batched generation
    prompts = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 88, 21, 7, 64, 30]])
    mask = (prompts != 0).long()
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}

    base = tiny_llama()
    with torch.no_grad():
        plain = base.generate(input_ids=prompts, attention_mask=mask, **greedy)
    for level in ("token", "sequence"):
        model = mixture(routing_level=level)
        with torch.no_grad():
            cached = model.generate(input_ids=prompts, attention_mask=mask, use_cache=True, **greedy)
            uncached = model.generate(input_ids=prompts, attention_mask=mask, use_cache=False, **greedy)
        assert torch.equal(cached, uncached), f"{level}-level routing: KV-cached decoding differs"
        assert not torch.equal(cached, plain), "the adapter should change the continuation"
        print(f"{level:>8}-level routing, KV cache == no cache: {cached[:, prompts.shape[1] :].tolist()}")

    # deployment: task-level routing pinned to task 2, merged into the base weights
    model = mixture(routing_level="task", num_tasks=3)
    task = torch.tensor([2, 2])
    with torch.no_grad():
        want = model.generate(input_ids=prompts, attention_mask=mask, mope_task_ids=task, **greedy)
        mope.fix_task(model, 2)
        merged = model.merge_and_unload()
        got = merged.generate(input_ids=prompts, attention_mask=mask, **greedy)
    assert type(merged) is LlamaForCausalLM and torch.equal(got, want)
    print(f"task 2, merged into a plain {type(merged).__name__}: same tokens as the mixture")


if __name__ == "__main__":
    main()
