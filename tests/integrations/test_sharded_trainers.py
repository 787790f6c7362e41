"""transformers' Trainer and TRL's SFTTrainer (MoPESFTTrainer) under FSDP2 and DeepSpeed ZeRO-3, end to end;
Trainer on a 4-bit base under FSDP2 too (FSDP-QLoRA).

Two CPU processes with accelerate's CPU guard lifted (conftest.SHARDED_ON_CPU), so the base is really sharded
(FSDP2 DTensors, ZeRO-3 partitions), against one process accumulating the same two micro-batches per step: the
losses and the bundle ``trainer.save_model()`` writes must be the one-process run's. SGD, not Adam: Adam's update
hardly depends on a gradient's scale, so a gradient averaged wrongly across the processes would still pass.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import SHARDED_ON_CPU, ZERO3, fsdp2, make_model, no_grad_logits, ranks_of_two_cpu_processes
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import mope

TESTS = str(Path(__file__).resolve().parents[1])
TOLERANCE = 1e-6  # measured: 0 under FSDP2, 7.5e-9 under ZeRO-3
LAUNCH_FLAGS = {"fsdp2": fsdp2("LlamaDecoderLayer"), "zero3": ZERO3}


def settings(folder, **args) -> dict:
    return dict(
        output_dir=str(folder), max_steps=3, per_device_train_batch_size=4, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, **args,
    )  # fmt: skip


def mixture() -> mope.MoPEConfig:
    torch.manual_seed(0)  # the adapter's initial weights
    return mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2, r=2)


def base_model(base: str, quantized: bool = False):
    """The tiny Llama saved in ``base``; ``quantized``: in 4 bits, its packed weights stored as floats so that FSDP2
    shards them (``bnb_4bit_quant_storage``, as PEFT's FSDP-QLoRA guide sets it)."""
    if not quantized:
        return AutoModelForCausalLM.from_pretrained(base)
    four_bits = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=four_bits)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def plain_trainer(folder, base: str, quantized: bool = False, **args) -> Trainer:
    """transformers.Trainer with TrainingArguments built first: under ZeRO-3 from_pretrained then builds the base
    partitioned (deepspeed.zero.Init), as transformers documents."""
    arguments = TrainingArguments(**settings(folder, remove_unused_columns=False, dataloader_pin_memory=False, **args))
    model = get_peft_model(base_model(base, quantized), mixture())
    ids = torch.randint(3, 128, (32, 12), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    return Trainer(model=model, args=arguments, train_dataset=rows)


def sft_trainer(folder, base: str, **args):
    """MoPESFTTrainer given the base's path and peft_config=, as TRL's examples do."""
    from conftest import word_tokenizer
    from test_trl import dataset
    from trl import SFTConfig

    from mope.integrations.trl import MoPESFTTrainer

    arguments = SFTConfig(**settings(folder, bf16=False, **args))
    return MoPESFTTrainer(
        model=base, args=arguments, train_dataset=dataset("messages"), processing_class=word_tokenizer(),
        peft_config=mixture(),
    )  # fmt: skip


TRAINERS = {"trainer": plain_trainer, "sft": sft_trainer, "qlora": functools.partial(plain_trainer, quantized=True)}
# Under FSDP2 Trainer.save_model writes nothing with accelerate's default SHARDED_STATE_DICT: PEFT's FSDP guide
# switches to FULL_STATE_DICT before saving, as the script does.
SHARDED_TRAINER = (
    SHARDED_ON_CPU
    + """
import json, sys
import torch
from torch.distributed.tensor import DTensor
sys.path[:0] = [sys.argv[2], os.path.join(sys.argv[2], "integrations")]
from test_sharded_trainers import TRAINERS
run = TRAINERS[sys.argv[3]](sys.argv[1], sys.argv[4])
run.train()
frozen = [p for p in run.model.parameters() if not p.requires_grad]
sharded = all(isinstance(p, DTensor) or (hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel) for p in frozen)
if run.is_fsdp_enabled:
    run.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
run.save_model(os.path.join(sys.argv[1], "bundle"))
result = {"type": run.accelerator.distributed_type.value, "sharded": sharded, "frozen": len(frozen)}
result["logs"] = [entry for entry in run.state.log_history if "loss" in entry]
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(result, handle)
"""
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, trainer",
    [("fsdp2", "trainer"), ("fsdp2", "sft"), ("fsdp2", "qlora"), ("zero3", "trainer"), ("zero3", "sft")],
)
def test_a_sharded_trainer_saves_the_bundle_of_one_process(kind, trainer, tmp_path):
    if kind == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8; see docs/training.md)")
    pytest.importorskip({"sft": "trl", "qlora": "bitsandbytes"}.get(trainer, "torch"))
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    sharded = tmp_path / kind
    sharded.mkdir()
    ranks = ranks_of_two_cpu_processes(SHARDED_TRAINER, sharded, TESTS, trainer, str(base), flags=LAUNCH_FLAGS[kind])
    for rank in ranks:
        assert rank["type"] == {"fsdp2": "FSDP", "zero3": "DEEPSPEED"}[kind] and rank["sharded"] and rank["frozen"] > 0
    assert ranks[0]["logs"] == ranks[1]["logs"] and len(ranks[0]["logs"]) == 3
    if trainer == "sft":  # MoPESFTTrainer adds the router loss and logs it
        assert all(entry["aux_loss"] > 0 for entry in ranks[0]["logs"])

    one = TRAINERS[trainer](tmp_path / "one", str(base), gradient_accumulation_steps=2)
    one.train()
    one.save_model(str(tmp_path / "one" / "bundle"))
    losses = [entry["loss"] for entry in one.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in ranks[0]["logs"]] == pytest.approx(losses)
    bundle, want = (load_file(f / "bundle" / "adapter_model.safetensors") for f in (sharded, tmp_path / "one"))
    assert bundle.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(bundle[name], tensor, atol=TOLERANCE, rtol=0, msg=name)
    assert max(t.abs().max().item() for n, t in want.items() if "lora_B" in n) > 1e3 * TOLERANCE  # it trained

    again = PeftModel.from_pretrained(base_model(str(base), trainer == "qlora"), str(sharded / "bundle"))
    batch = {"input_ids": torch.tensor([[2, 5, 9, 21]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    # Both in eval mode, as from_pretrained leaves `again`: on a CPU with AVX512-BF16, bitsandbytes' Linear4bit
    # computes eval-mode no-grad forwards in bf16 (weights repacked), training-mode ones in float32 (2.3e-3 apart).
    one.model.eval()
    torch.testing.assert_close(no_grad_logits(again, batch), no_grad_logits(one.model, batch), rtol=0, atol=1e-5)
