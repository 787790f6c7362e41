"""Fine-tune a MoPE mixture with TRL's SFTTrainer on a chat dataset (tiny random Llama, CPU).

Run:  python examples/trl_sft.py [--out DIR]      (needs: pip install 'mope[trl]')

``MoPESFTTrainer`` is ``trl.SFTTrainer`` plus MoPE's router loss in the optimised loss (plain
SFTTrainer computes its own loss and would drop it) and ``aux_loss`` / expert balance in the
logs. ``peft_config=MoPEConfig(...)`` wraps the model as for any PEFT method; checkpoints and the
final save are adapter-only MoPE bundles. The script checks the logs and that the bundle reloads
onto a fresh base with the trained model's logits.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

import mope
from mope.integrations.trl import MoPESFTTrainer

warnings.filterwarnings("ignore", category=UserWarning)

WORDS = ["<pad>", "<eos>", "user:", "assistant:"] + [f"w{i}" for i in range(60)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with a chat template (no download)."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_rows(count: int = 64) -> Dataset:
    """Conversations whose answer depends on the question's words: w_i w_j -> w_(i+j) w_(i*j)."""
    rows = []
    for n in range(count):
        i, j = n % 7, (n // 7) % 5
        question = f"w{i} w{j}"
        answer = f"w{10 + i + j} w{20 + (i * j) % 30}"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mope-trl-")

    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "up_proj"], num_experts=4, top_k=2, r=4
    )
    training = SFTConfig(
        output_dir=out,
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=2,
        save_strategy="steps",
        save_steps=6,
        report_to=[],
        use_cpu=True,
        bf16=False,  # SFTConfig defaults to bf16 autocast; fp32 here, so the reload check can be exact
    )
    trainer = MoPESFTTrainer(
        model=tiny_llama(),
        args=training,
        train_dataset=chat_rows(),
        processing_class=word_tokenizer(),
        peft_config=config,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        print(
            f"step {entry['step']}: loss {entry['loss']:.4f}  aux_loss {entry['aux_loss']:.4f}  "
            f"expert_load_cv {entry['expert_load_cv']:.3f}  expert_load_max {entry['expert_load_max']:.2f}"
        )
    assert all(entry["aux_loss"] > 0 for entry in logs)

    checkpoint = os.listdir(os.path.join(out, "checkpoint-6"))
    assert "adapter_model.safetensors" in checkpoint and "model.safetensors" not in checkpoint, checkpoint
    trainer.save_model(out)
    again = PeftModel.from_pretrained(tiny_llama(), out)
    batch = word_tokenizer()(["user: w1 w2 assistant:", "user: w3 w4 assistant:"], return_tensors="pt")
    model = trainer.model.eval()
    with torch.no_grad():
        diff = (again(**batch).logits - model(**batch).logits).abs().max().item()
    print(f"{out}: adapter-only MoPE bundle; reloads with max |logit difference| {diff:.1e}")
    assert diff < 1e-5


if __name__ == "__main__":
    main()
