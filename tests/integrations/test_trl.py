"""TRL's SFTTrainer with a MoPE mixture: the router loss reaches the optimised loss, the logs show it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

pytest.importorskip("trl")
from conftest import make_model, no_grad_logits, ranks_of_two_cpu_processes, word_tokenizer
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import mope
from mope.integrations.trl import MoPESFTTrainer

TESTS = str(Path(__file__).resolve().parents[1])


def dataset(kind: str, count: int = 16) -> Dataset:
    """Conversations ('messages') or prompt/completion pairs (TRL's completion-only loss)."""
    rows = []
    for n in range(count):
        question = [{"role": "user", "content": f"t{3 + n % 5} t{9 + n % 4}"}]
        answer = [{"role": "assistant", "content": f"t{20 + n % 6} t{30 + n % 3}"}]
        rows.append(
            {"messages": question + answer} if kind == "messages" else {"prompt": question, "completion": answer}
        )
    return Dataset.from_list(rows)


def trainer(
    folder, kind: str = "messages", cls=MoPESFTTrainer, model=None, routing_level="token", **args
) -> SFTTrainer:
    model = make_model("llama") if model is None else model
    settings = dict(output_dir=str(folder), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2)
    settings.update(report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1)
    settings.update(args)
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "up_proj"],
        num_experts=4,
        top_k=2,
        r=2,
        routing_level=routing_level,
    )
    return cls(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=dataset(kind),
        processing_class=word_tokenizer(model.config.vocab_size),
        peft_config=config,
    )


def first_batch(sft: SFTTrainer) -> dict:
    return next(iter(sft.get_train_dataloader()))


@pytest.mark.parametrize("kind", ["messages", "prompt_completion"])
def test_the_optimised_loss_holds_the_aux_loss_that_plain_sft_drops(kind, tmp_path):
    sft = trainer(tmp_path, kind)
    sft.model.train()
    batch = first_batch(sft)
    plain = SFTTrainer.compute_loss(sft, sft.model, dict(batch)).detach()
    ours = sft.compute_loss(sft.model, dict(batch)).detach()
    aux = sft.model(**{k: v for k, v in batch.items() if k != "labels"}).aux_loss.detach()
    assert aux > 0
    # plain SFTTrainer computes its loss from the fused head's log-probs: MoPE's aux loss is not in it
    assert torch.allclose(ours - plain, aux, rtol=0, atol=2e-6)  # float32 losses near 10


def test_aux_loss_is_divided_over_accumulation_steps_as_trl_does_for_moe_models(tmp_path):
    sft = trainer(tmp_path, gradient_accumulation_steps=2)
    sft.model.train()
    sft.current_gradient_accumulation_steps = 2
    batch = first_batch(sft)
    plain = SFTTrainer.compute_loss(sft, sft.model, dict(batch), num_items_in_batch=torch.tensor(20)).detach()
    ours = sft.compute_loss(sft.model, dict(batch), num_items_in_batch=torch.tensor(20)).detach()
    aux = sft.model(**{k: v for k, v in batch.items() if k != "labels"}).aux_loss.detach()
    assert torch.allclose(ours - plain, aux / 2, rtol=0, atol=2e-6)  # float32 losses near 10


def test_router_gets_the_aux_gradient(tmp_path):
    sft = trainer(tmp_path)
    sft.model.train()
    batch = first_batch(sft)
    router = next(p for n, p in sft.model.named_parameters() if "mope_router" in n)
    grads = []
    for compute in (SFTTrainer.compute_loss, MoPESFTTrainer.compute_loss):
        sft.model.zero_grad()
        compute(sft, sft.model, dict(batch)).backward()
        grads.append(router.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_logs_hold_aux_loss_and_balance_and_the_bundle_reloads(tmp_path):
    sft = trainer(tmp_path, save_strategy="steps", save_steps=2)
    sft.train()
    logs = [entry for entry in sft.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        assert entry["aux_loss"] > 0
        assert entry["expert_load_cv"] >= 0 and 1 <= entry["expert_load_max"] <= 4
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    sft.save_model(str(tmp_path / "final"))
    batch = {"input_ids": torch.tensor([[2, 5, 9, 21]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    for folder in (checkpoint, tmp_path / "final"):
        again = PeftModel.from_pretrained(make_model("llama"), str(folder))
        torch.testing.assert_close(no_grad_logits(again, batch), no_grad_logits(sft.model, batch), rtol=0, atol=0)


def test_wrapped_packing_is_refused_for_sequence_level_routing_before_the_model_changes(tmp_path):
    # its rows glue several examples with a mask of ones and no position_ids: one decision pooled them all, silently
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"routes per sequence .* packing_strategy='wrapped'"):
        trainer(
            tmp_path, model=model, routing_level="sequence", packing=True, packing_strategy="wrapped", max_length=16
        )
    assert not any(isinstance(module, mope.MoPELayer) for module in model.modules())
    with pytest.raises(ValueError, match=r"routes per sequence"):  # padding_free: position_ids restart per row only
        trainer(tmp_path, routing_level="sequence", packing=True, packing_strategy="wrapped", padding_free=True)
    for options in ({"routing_level": "token", "packing_strategy": "wrapped"}, {"routing_level": "sequence"}):
        trainer(tmp_path, packing=True, max_length=16, **options)  # per token; or a packing the forward checks


SFT_UNDER_DDP = """
import json, os, sys
import torch
sys.path[:0] = [sys.argv[2], os.path.join(sys.argv[2], "integrations")]
from test_trl import trainer

sft = trainer(sys.argv[1], per_device_train_batch_size=4)
sft.train()
weights = sum(p.double().sum().item() for p in sft.model.parameters() if p.requires_grad)
logs = [entry for entry in sft.state.log_history if "loss" in entry]
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump({"weights": weights, "logs": logs}, handle)
"""


@pytest.mark.slow
def test_sft_under_ddp_trains_and_logs_the_aux_loss_on_two_processes(tmp_path):
    # TRL's loss path ran under DDP before the aux_loss output fix too (Trainer's did not): kept so both stay so.
    ranks = ranks_of_two_cpu_processes(SFT_UNDER_DDP, tmp_path, TESTS)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert [entry["step"] for entry in ranks[0]["logs"]] == [1, 2]
    assert all(entry["aux_loss"] > 0 for entry in ranks[0]["logs"])
