"""The dense-to-sparse router schedule (mope.routing.schedule): annealing, saving the step, manual stepping, the
Trainer callback.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import mope
from mope.layer import MoPELayer


def scheduled_model(counter: str = "forward"):
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=1, r=4, init_weights=False,
        router_schedule_steps=4, router_schedule_start_top_k=4, router_schedule_start_temperature=4.0,
        router_schedule_counter=counter,
    )  # fmt: skip
    return get_peft_model(make_model("llama"), config)


def routers(model) -> list:
    return [m.mope_router["default"] for m in model.modules() if isinstance(m, MoPELayer)]


def test_schedule_starts_dense_and_anneals_to_top_k():
    model = scheduled_model()
    gate = routers(model)[0]
    assert (gate.top_k, gate.temperature) == (4, 4.0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(gate(x).weights, torch.softmax(x @ gate.weight.T / 4.0, -1))  # top-4 of 4 = dense
    batch = make_batch("llama")
    model.train()
    for _ in range(2):
        model(**batch)
    model.eval()
    with torch.no_grad():
        model(**batch)  # the pre-hook hands the routers the progress of step 2
    assert model.base_model.mope_schedule["default"].step.item() == 2
    assert {(g.top_k, g.temperature) for g in routers(model)} == {(3, 2.5)}  # round(4 - 3 * 0.5), 4 - 3 * 0.5
    model.train()
    for _ in range(3):
        model(**batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert {(g.top_k, g.temperature) for g in routers(model)} == {(1, 1.0)}
    assert ((gate(x).weights > 0).sum(-1) == 1).all()


def test_schedule_anneals_expert_choice_capacity_with_top_k():
    # capacity_factor=None means f = top_k: from 4 experts per token (every expert takes every token) to 1
    config = mope.MoPEConfig(
        task_type="SEQ_CLS", target_modules=["query"], num_experts=4, top_k=1, r=4, router="expert_choice",
        router_schedule_steps=2, router_schedule_start_top_k=4,
    )  # fmt: skip
    model = get_peft_model(make_model("bert"), config)
    gate = routers(model)[0]
    x = torch.randn(16, 64)
    assert ((gate(x).weights > 0).sum(-1) == 4).all()
    model.train()
    batch = make_batch("bert")
    for _ in range(2):
        model(**batch)
    model.eval()
    with torch.no_grad():
        model(**batch)  # hands the routers the end of the schedule
    chosen = gate(x).weights > 0
    assert chosen.sum(0).tolist() == [4, 4, 4, 4] and chosen.sum().item() == 16  # c = ceil(1 * 16 / 4)


def test_a_no_grad_forward_in_training_mode_does_not_advance_the_schedule():
    # TRL's SFTTrainer runs one under label smoothing or a compute_loss_func, for its metrics: it counted as a step
    model = scheduled_model()
    model.train()
    with torch.no_grad():
        model(**make_batch("llama"))
    assert model.base_model.mope_schedule["default"].step.item() == 0
    model(**make_batch("llama"))
    assert model.base_model.mope_schedule["default"].step.item() == 1


def test_a_forward_with_the_adapters_disabled_does_not_advance_the_schedule():
    # a reference pass under disable_adapter() with autograd on (the routers do not run) counted as a step
    model = scheduled_model()
    model.train()
    with model.disable_adapter():
        model(**make_batch("llama"))  # autograd on, as a training forward
    assert model.base_model.mope_schedule["default"].step.item() == 0
    model(**make_batch("llama"))
    assert model.base_model.mope_schedule["default"].step.item() == 1


def test_schedule_step_is_saved_and_restored(tmp_path):
    model = scheduled_model()
    model.train()
    batch = make_batch("llama")
    for _ in range(2):
        model(**batch)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.mope_schedule.step"].item() == 2
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
    assert {(g.top_k, g.temperature) for g in routers(loaded)} == {(3, 2.5)}
    plain = get_peft_model(make_model("llama"), mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")  # bundles without a schedule keep their keys
    assert not any("mope_schedule" in key for key in load_file(tmp_path / "plain" / "adapter_model.safetensors"))


def test_manual_schedule_counts_optimizer_steps_only():
    model = scheduled_model(counter="manual")
    model.train()
    batch = make_batch("llama")
    for _ in range(3):  # e.g. three micro-batches of one accumulated step
        model(**batch)
    mope.step_schedule(model)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert model.base_model.mope_schedule["default"].step.item() == 1
    assert {g.top_k for g in routers(model)} == {3}  # round(4 - 3 * 0.25)
    mope.step_schedule(get_peft_model(make_model("llama"), mope.MoPEConfig(task_type="CAUSAL_LM")))  # no-op
    with pytest.raises(ValueError, match="MoPE model"):
        mope.step_schedule(make_model("llama"))


def test_deleted_adapter_takes_its_schedule_step_along(tmp_path):
    model = scheduled_model()
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["k_proj"], num_experts=2, top_k=1,
        router_schedule_steps=2, router_schedule_start_top_k=2,
    )  # fmt: skip
    model.add_adapter("other", config)
    assert set(model.base_model.mope_schedule) == {"default", "other"}
    model.delete_adapter("other")
    assert set(model.base_model.mope_schedule) == {"default"}
    model.save_pretrained(tmp_path)
    keys = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "mope_schedule" in k]
    assert keys == ["base_model.mope_schedule.step"]


def test_schedule_callback_steps_a_manual_schedule_per_trainer_step(tmp_path):
    model = scheduled_model(counter="manual")
    batch = make_batch("llama")
    rows = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows * 4, callbacks=[mope.ScheduleCallback()])
    trainer.train()
    assert model.base_model.mope_schedule["default"].step.item() == 3  # optimizer steps, not the 6 micro-batches
    assert {g.top_k for g in routers(model)} == {2}  # round(4 - 3 * 0.75)


@pytest.mark.parametrize("counter", ["forward", "manual"])
def test_checkpointing_recomputes_with_the_forwards_schedule_values(counter):
    # the step advanced at the forward's end, before backward recomputed its layers with the next step's top_k
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=1, r=4, init_weights=False,
        router_schedule_steps=1, router_schedule_start_top_k=4, router_schedule_start_temperature=5.0,
        router_schedule_counter=counter,
    )  # fmt: skip
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**make_batch("llama")).loss.backward()
        mope.step_schedule(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert {(g.top_k, g.temperature) for g in routers(model)} == {(1, 1.0)}  # both advanced, values moved
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
