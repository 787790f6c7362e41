"""mope.log_routing: MoPE's aux loss and expert balance in transformers.Trainer's logs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, ranks_of_two_cpu_processes
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import mope
from mope.integrations.trainer import TrainingLoad
from mope.routing import RoutingInputs


def rows(count: int = 8, seq: int = 12) -> list[dict]:
    ids = torch.randint(3, 128, (count, seq), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def trainer(folder, steps: int = 2) -> Trainer:
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2, r=2)
    model = get_peft_model(make_model("llama"), config)
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    return Trainer(model=model, args=args, train_dataset=rows())


def test_logged_values_are_the_training_forwards_aux_loss_and_load(tmp_path):
    run = trainer(tmp_path, steps=1)
    callback = mope.log_routing(run)
    assert run.callback_handler.callbacks[0] is callback  # first: reporters and the progress bar see the values
    seen = []
    handle = run.model.register_forward_hook(lambda m, a, out: seen.append(out["aux_loss"].detach()))
    with mope.routing_stats(run.model) as stats:
        run.train()
        report = stats.report()
    handle.remove()
    log = next(entry for entry in run.state.log_history if "loss" in entry)
    assert log["aux_loss"] == pytest.approx(torch.stack(seen).mean().item(), rel=1e-6)
    shares = [torch.tensor(layer["load"]) for layer in report.values()]
    assert log["expert_load_cv"] == pytest.approx(sum(layer["load_cv"] for layer in report.values()) / len(report))
    assert log["expert_load_max"] == pytest.approx(max((s.max() * 4).item() for s in shares), rel=1e-5)
    assert 1 <= log["expert_load_max"] <= 4


def test_each_log_covers_only_the_steps_since_the_last(tmp_path):
    run = trainer(tmp_path, steps=3)
    mope.log_routing(run)
    seen = []
    handle = run.model.register_forward_hook(lambda m, a, out: seen.append(out["aux_loss"].item()))
    run.train()
    handle.remove()
    logs = [entry for entry in run.state.log_history if "loss" in entry]
    assert [entry["aux_loss"] for entry in logs] == pytest.approx(seen, rel=1e-6)


def test_hooks_are_removed_after_training_and_eval_forwards_are_not_counted(tmp_path):
    run = trainer(tmp_path, steps=1)
    callback = mope.log_routing(run)
    run.train()
    routers = [m for n, m in run.model.named_modules() if n.endswith("mope_router.default")]
    assert routers and all(not r._forward_hooks for r in routers)
    assert callback.routers is None and callback.aux_handle is None
    load = TrainingLoad(routers[0].eval())
    load.update(routers[0](torch.randn(1, 3, 64)), RoutingInputs())  # an eval forward: not counted
    assert load.load is None
    routers[0].train()
    with torch.no_grad():  # nor a training-mode forward that trains nothing (TRL's metrics pass)
        load.update(routers[0](torch.randn(1, 3, 64)), RoutingInputs())
    assert load.load is None
    load.update(routers[0](torch.randn(1, 3, 64)), RoutingInputs())
    assert load.load is not None and load.load.sum() == pytest.approx(3.0)


def sgd_trainer(
    folder, batch: int, accumulation: int, cls: type = Trainer, task_type: str | None = "CAUSAL_LM", **extra
) -> Trainer:
    """One SGD step (lr 1) on 4 rows; z-loss only: a per-token mean, so one batch of 4 and two micro-batches of 2
    have the same router loss."""
    config = mope.MoPEConfig(
        task_type=task_type, target_modules=["q_proj", "up_proj"], num_experts=4, top_k=2, r=2,
        aux_loss_coef=0.0, z_loss_coef=1.0, init_weights=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config)
    args = TrainingArguments(
        output_dir=str(folder), max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, report_to=[], use_cpu=True,
        save_strategy="no", remove_unused_columns=False, dataloader_pin_memory=False, **extra,
    )  # fmt: skip
    return cls(model=model, args=args, train_dataset=rows(4))


def one_sgd_step(folder, batch: int, accumulation: int, **kwargs) -> dict[str, torch.Tensor]:
    run = sgd_trainer(folder, batch, accumulation, **kwargs)
    run.train()
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def assert_accumulation_matches_one_batch(folder, **kwargs) -> None:
    whole = one_sgd_step(folder / "whole", 4, 1, **kwargs)
    accumulated = one_sgd_step(folder / "accumulated", 2, 2, **kwargs)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_gradient_accumulation_weighs_the_router_loss_as_one_batch_does(tmp_path, task_type):
    # Trainer passes num_items_in_batch and no longer divides a causal LM's loss by the accumulation steps:
    # the aux loss added per micro-batch counted twice (the routers' aux gradient was 2x that of one batch); so too
    # without a task_type (a plain PeftModel: the weighting read only the task type)
    assert_accumulation_matches_one_batch(tmp_path, task_type=task_type)


def test_the_aux_loss_is_weighted_by_tokens_only_where_the_lm_loss_is():
    # without a task_type the weighting follows the model's class, and only a class whose loss reads
    # num_items_in_batch (transformers' loss_function): BartForCausalLM's plain mean got half the aux (0.51 of 1.01)
    from transformers import BartConfig, BartForCausalLM

    config = mope.MoPEConfig(target_modules=["q_proj"], num_experts=4, top_k=2, aux_loss_coef=1.0)
    tiny = BartConfig(vocab_size=64, d_model=16, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32)
    causal = {
        "llama": get_peft_model(make_model("llama"), config),
        "bart": get_peft_model(BartForCausalLM(tiny), config),
    }
    assert {name: model.base_model.causal_lm() for name, model in causal.items()} == {"llama": True, "bart": False}


def test_an_adapter_without_routers_is_named(tmp_path):
    run = trainer(tmp_path, steps=1)
    mope.log_routing(run, adapter_name="other")
    with pytest.raises(ValueError, match="no MoPE router for adapter 'other'"):
        run.train()


def classifier_trainer(model, folder, steps: int) -> Trainer:
    ids = torch.randint(3, 128, (16, 12), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": int(i[0]) % 3} for i in ids]
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def snapshot(model, head: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters of the head (or of everything else), copied."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and ("modules_to_save" in n.split(".")) == head
    }


def moved(before: dict[str, torch.Tensor], model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, value in before.items() if not torch.equal(value, now[n])}


def test_head_only_trains_the_head_alone_then_a_second_trainer_trains_everything(tmp_path):
    config = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["query", "value"], num_experts=4, top_k=2, r=2)
    model = get_peft_model(make_model("bert"), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head, others = snapshot(model, True), snapshot(model, False)
    assert head and others and any("router" in n for n in others)

    with mope.head_only(model) as names:
        assert names == set(head)
        probe = classifier_trainer(model, tmp_path / "probe", steps=2)
        probe.train()
        optimised = {id(p) for g in probe.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if n in head}
    assert moved(head, model) == set(head) and not moved(others, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable

    classifier_trainer(model, tmp_path / "run", steps=2).train()
    assert moved(others, model) == set(others)


def test_head_only_refuses_a_model_without_a_head_and_restores_after_an_error(tmp_path):
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4, top_k=2, r=2)
    model = get_peft_model(make_model("llama"), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with (
        pytest.raises(
            ValueError, match=r"head_only: the model has no trainable task head .* the config's modules_to_save"
        ),
        mope.head_only(model),
    ):
        pass
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable

    classifier = get_peft_model(make_model("bert"), mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["query"]))
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="inside"), mope.head_only(classifier):
        raise RuntimeError("inside")
    assert {n for n, p in classifier.named_parameters() if p.requires_grad} == trainable


TWO_TRAINERS = """
import json, os, sys
import torch, transformers
from peft import get_peft_model
from transformers import Trainer, TrainingArguments
import mope

torch.manual_seed(0)
bert = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, num_labels=3)
config = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["query", "value"], num_experts=4, top_k=2, r=2)
model = get_peft_model(transformers.BertForSequenceClassification(bert), config)
ids = torch.randint(3, 128, (32, 12), generator=torch.Generator().manual_seed(4))
data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": int(i[0]) % 3} for i in ids]

def trainer(steps):
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
                             report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=data)

def sums():
    head = sum(p.double().sum().item() for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad)
    rest = sum(p.double().sum().item() for n, p in model.named_parameters() if "modules_to_save" not in n and p.requires_grad)
    return [head, rest]

seen = [sums()]
with mope.head_only(model):
    trainer(2).train()
seen.append(sums())
trainer(2).train()
seen.append(sums())
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(seen, handle)
"""


@pytest.mark.slow
def test_head_only_under_ddp_then_a_second_trainer_leaves_both_processes_equal(tmp_path):
    ranks = ranks_of_two_cpu_processes(TWO_TRAINERS, tmp_path)
    assert ranks[0] == ranks[1]
    (head0, rest0), (head1, rest1), (head2, rest2) = ranks[0]
    assert head1 != head0 and rest1 == rest0  # the probe moved the head alone
    assert head2 != head1 and rest2 != rest1  # then everything trained


def test_mope_trainer_adds_the_router_loss_that_label_smoothing_leaves_out(tmp_path):
    # with label_smoothing_factor (or a compute_loss_func) Trainer computes the loss from the logits: a plain
    # Trainer optimised no router loss at all
    from mope.integrations.hf_trainer import MoPETrainer

    run = sgd_trainer(tmp_path, 4, 1, cls=MoPETrainer, label_smoothing_factor=0.1)
    run.model.train()
    batch = dict(next(iter(run.get_train_dataloader())))
    plain = Trainer.compute_loss(run, run.model, dict(batch)).detach()
    ours = run.compute_loss(run.model, dict(batch)).detach()
    aux = run.model(**{k: v for k, v in batch.items() if k != "labels"}).aux_loss.detach()
    assert aux > 0
    torch.testing.assert_close(ours - plain, aux, rtol=0, atol=2e-6)
    assert_accumulation_matches_one_batch(tmp_path, cls=MoPETrainer, label_smoothing_factor=0.1)


def test_runs_stopped_by_an_error_leave_one_set_of_hooks(tmp_path):
    # on_train_end never ran after an error: each new run's callback added a set of hooks on the same model
    run = trainer(tmp_path, steps=1)
    routers = [m for n, m in run.model.named_modules() if n.endswith("mope_router.default")]
    for attempt in range(3):
        again = Trainer(model=run.model, args=run.args, train_dataset=rows())
        mope.log_routing(again)
        handle = again.model.register_forward_hook(lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            again.train()
        handle.remove()
        assert all(len(r._forward_hooks) == 1 for r in routers), attempt
