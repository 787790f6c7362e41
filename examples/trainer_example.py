"""Train a MoPE mixture with ``transformers.Trainer`` instead of the accelerate recipes.

Run:  python examples/trainer_example.py [--out DIR]

Nothing special is needed: in training mode the model output's ``loss`` already includes the
router losses (``aux_loss``), so the Trainer's optimiser sees them, and the Trainer recognises
the ``PeftModel`` and writes adapter-only checkpoints (adapter_config.json +
adapter_model.safetensors). The script checks both.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

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
    )
    return LlamaForCausalLM(config)


class AuxLossTrainer(Trainer):
    """Only to show the aux loss: records the last ``aux_loss`` the optimiser's loss contained."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.last_aux_loss = outputs["aux_loss"].item()
        return (loss, outputs) if return_outputs else loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mope-trainer-")

    model = get_peft_model(
        tiny_llama(), mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4)
    )
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in torch.randint(0, 256, (32, 16), generator=g)
    ]
    training = TrainingArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_steps=2,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        remove_unused_columns=False,
    )
    trainer = AuxLossTrainer(model=model, args=training, train_dataset=rows)
    trainer.train()
    print(f"last aux_loss inside the optimised loss: {trainer.last_aux_loss:.5f}")

    checkpoint = os.path.join(out, "checkpoint-4")
    files = sorted(os.listdir(checkpoint))
    print(f"{checkpoint}: {files}")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    again = PeftModel.from_pretrained(tiny_llama(), checkpoint)
    batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        diff = (again(**batch).logits - model(**batch).logits).abs().max().item()
    print(f"checkpoint reloads with max |logit difference| {diff:.1e}")
    assert diff < 1e-5


if __name__ == "__main__":
    main()
