"""TRL's preference, reward and RL trainers with a MoPE mixture: the optimised loss is TRL's plus the router loss.

Plain DPO/KTO/Reward/GRPO/RLOO trainers compute their loss from log-ratios, scores or advantages and never read
``aux_loss``: a mixture trained under them had no balance loss (DPO's first loss was exactly ln 2 while the logged
aux loss was 0.5). Each test runs two steps of the real trainer and compares, call by call, the loss TRL's own
``compute_loss`` returned with the one the MoPE subclass returned.
"""

from __future__ import annotations

import pytest
import torch
import transformers

pytest.importorskip("trl")
from conftest import make_model, word_tokenizer
from datasets import Dataset
from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, RLOOConfig

import mope
from mope.integrations import trl as mope_trl

ROWS = [{"prompt": f"t{5 + n % 7} t{9 + n % 4}", "chosen": f" t{20 + n % 6} t{30 + n % 3}", "rejected": f" t{40 + n % 5}"}
        for n in range(8)]  # fmt: skip


def reward_of_length(completions, **kwargs) -> list[float]:
    return [float(len(completion)) for completion in completions]


def build(kind: str, folder) -> transformers.Trainer:
    common = dict(output_dir=str(folder), max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False)
    common.update(save_strategy="no", logging_steps=1, per_device_train_batch_size=4)
    config = dict(target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2, r=2, aux_loss_coef=0.5)
    lm = dict(model=make_model("llama"), peft_config=mope.MoPEConfig(task_type="CAUSAL_LM", **config))
    if kind == "dpo":
        return mope_trl.MoPEDPOTrainer(args=DPOConfig(**common), train_dataset=Dataset.from_list(ROWS), **lm,
                                       processing_class=word_tokenizer())  # fmt: skip
    if kind == "kto":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": n % 2 == 0} for n, r in enumerate(ROWS)]
        return mope_trl.MoPEKTOTrainer(args=KTOConfig(**common), train_dataset=Dataset.from_list(rows), **lm,
                                       processing_class=word_tokenizer())  # fmt: skip
    if kind == "reward":
        torch.manual_seed(0)
        scorer = transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=1)
        )  # fmt: skip
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in ROWS]
        return mope_trl.MoPERewardTrainer(
            model=scorer, args=RewardConfig(**common), train_dataset=Dataset.from_list(rows),
            processing_class=word_tokenizer(), peft_config=mope.MoPEConfig(task_type="SEQ_CLS", **config),
        )  # fmt: skip
    rl = dict(num_generations=2, max_completion_length=3, per_device_train_batch_size=4)
    rows = Dataset.from_list([{"prompt": r["prompt"]} for r in ROWS])
    if kind == "grpo":
        return mope_trl.MoPEGRPOTrainer(args=GRPOConfig(**{**common, **rl}), train_dataset=rows, **lm,
                                        reward_funcs=reward_of_length, processing_class=word_tokenizer())  # fmt: skip
    return mope_trl.MoPERLOOTrainer(args=RLOOConfig(**{**common, **rl}), train_dataset=rows, **lm,
                                    reward_funcs=reward_of_length, processing_class=word_tokenizer())  # fmt: skip


@pytest.mark.parametrize("kind", ["dpo", "kto", "reward", "grpo", "rloo"])
def test_the_optimised_loss_is_trl_s_plus_the_router_loss(kind, tmp_path, monkeypatch):
    trainer = build(kind, tmp_path)
    cls = type(trainer)
    trl_class = cls.__mro__[cls.__mro__.index(mope_trl.RouterLosses) + 1]
    calls: list[dict] = []
    original = trl_class.compute_loss

    def trl_loss(self, *args, **kwargs):
        calls.append({"aux": []})
        result = original(self, *args, **kwargs)
        calls[-1]["trl"] = (result[0] if isinstance(result, tuple) else result).detach()
        return result

    def ours(self, *args, **kwargs):
        result = mope_trl.RouterLosses.compute_loss(self, *args, **kwargs)
        calls[-1]["ours"] = (result[0] if isinstance(result, tuple) else result).detach()
        return result

    def record(module, args, output):
        aux = output.get("aux_loss") if hasattr(output, "get") else None
        if calls and aux is not None and aux.requires_grad:
            calls[-1]["aux"].append(aux.detach())

    monkeypatch.setattr(trl_class, "compute_loss", trl_loss)
    monkeypatch.setattr(cls, "compute_loss", ours)
    trainer.model.register_forward_hook(record)
    trainer.train()
    assert len(calls) == 2
    for call in calls:
        aux = torch.stack(call["aux"]).mean()
        assert aux > 0
        torch.testing.assert_close(call["ours"], call["trl"] + aux, rtol=0, atol=1e-6)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["aux_loss"] > 0 and entry["expert_load_max"] >= 1 for entry in logs)


def test_a_reference_adapter_copied_by_trl_routes_as_the_policy(tmp_path):
    # a PeftModel given to DPO: TRL adds a frozen "ref" adapter and copies the policy's parameters only, so the
    # reference's schedule step (a buffer) stayed 0 and it routed with the schedule's start top_k
    from peft import get_peft_model

    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, top_k=1, r=2, init_weights=False,
        router_schedule_steps=2, router_schedule_start_top_k=4,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config).train()
    for _ in range(2):
        model(input_ids=torch.tensor([[5, 6, 7]]))  # the schedule at its end: top_k 1
    common = dict(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = mope_trl.MoPEDPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(ROWS),
                                      processing_class=word_tokenizer())  # fmt: skip
    schedules = trainer.model.base_model.mope_schedule
    assert {name: schedules[name].step.item() for name in ("default", "ref")} == {"default": 2, "ref": 2}
    layers = [m for m in trainer.model.modules() if isinstance(m, mope.MoPELayer)]
    assert {(m.mope_router["default"].top_k, m.mope_router["ref"].top_k) for m in layers} == {(1, 1)}
