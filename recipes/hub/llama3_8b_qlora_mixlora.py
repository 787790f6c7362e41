"""QLoRA MixLoRA: top-2 of 8 LoRA experts (r=8) on the MLP of a 4-bit Llama-3-8B, one router per MLP block.

Needs a CUDA GPU (about 12 GB at batch 4 x 512), the hub (meta-llama/Meta-Llama-3-8B is gated:
`huggingface-cli login` first) and `pip install 'mope[quant,train]'`. Run:

    python recipes/hub/llama3_8b_qlora_mixlora.py --output-dir out/qlora_mixlora
    python recipes/hub/llama3_8b_qlora_mixlora.py --max-steps 20      # a short check first

The base is loaded in 4 bits (nf4, double quantization, bf16 compute) and prepared with
``peft.prepare_model_for_kbit_training`` using non-reentrant gradient checkpointing (with the
reentrant kind the router losses would not reach the routers: docs/quantized.md). Experts and
routers stay fp32. ``transformers.Trainer`` trains it; ``mope.log_routing`` adds the router loss and
expert load to its logs. The adapter is saved as a MoPE bundle (``PeftModel.from_pretrained`` after
``import mope``); it loads onto the same 4-bit base.

This is a Python script rather than a YAML recipe: the recipe schema (``mope.training.recipe``) has no
quantization setting.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from peft import get_peft_model, prepare_model_for_kbit_training

import mope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--data", default="yahma/alpaca-cleaned")
    parser.add_argument("--output-dir", default="out/qlora_mixlora")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: two epochs")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import datasets  # the train extra

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules=["gate_proj", "up_proj", "down_proj"],
        num_experts=8,
        top_k=2,
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        router_blocks=["mlp"],  # MixLoRA: one router per MLP block
        aux_loss_coef=0.01,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    def tokenize(example: dict) -> dict:
        text = f"{example['instruction']}\n{example.get('input') or ''}\n{example['output']}{tokenizer.eos_token}"
        return tokenizer(text, truncation=True, max_length=args.max_length)

    train = datasets.load_dataset(args.data, split="train")
    train = train.map(tokenize, remove_columns=train.column_names)
    trainer = transformers.Trainer(
        model=model,
        train_dataset=train,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        args=transformers.TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=2,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=8,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=100,
            bf16=True,
            logging_steps=10,
            save_steps=500,
        ),
    )
    mope.log_routing(trainer)
    trainer.train()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
