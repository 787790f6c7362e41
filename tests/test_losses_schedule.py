"""Importance CV^2, entropy and LoRAMoE's localized balancing losses; the dense-to-sparse schedule."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import mope
from mope.layer import MoPELayer
from mope.losses import entropy_loss, importance_loss, localized_balance_loss
from mope.routing import Routing


def routing_of(logits: torch.Tensor, k: int | None = None) -> Routing:
    probs = logits.softmax(-1)
    weights = probs
    if k is not None:
        top = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    return Routing(weights=weights, probs=probs, logits=logits, load=weights)


def test_importance_loss_reference_values():
    n, tokens = 4, 12
    uniform = torch.eye(n).repeat(tokens // n, 1)
    collapsed = torch.zeros(tokens, n)
    collapsed[:, 0] = 1.0
    for weights, want in ((uniform, 0.0), (collapsed, n - 1.0)):  # CV^2 of [T, 0, 0, 0] is N - 1
        routing = Routing(weights=weights, probs=weights, logits=weights, load=weights)
        assert importance_loss(routing, None).item() == pytest.approx(want, abs=1e-6)
    logits = torch.randn(3, 5, n)
    routing = routing_of(logits, k=2)
    importance = routing.weights.reshape(-1, n).sum(0)
    want = importance.var(unbiased=False) / importance.mean() ** 2
    torch.testing.assert_close(importance_loss(routing, None), want)


def test_entropy_loss_reference_values():
    logits = torch.randn(2, 3, 4)
    routing = routing_of(logits)
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_loss(routing, None), -(p * p.log()).sum(-1).mean())
    selectors = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])  # one token, two selectors
    with_selectors = Routing(
        weights=selectors.mean(1),
        probs=selectors.mean(1),
        logits=selectors.mean(1),
        load=selectors.mean(1),
        selectors=selectors,
    )
    assert entropy_loss(with_selectors, None).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def loramoe_reference(weights: torch.Tensor, types: torch.Tensor, alpha: float) -> torch.Tensor:
    """LoRAMoE's code (peft/tuners/lora.py, ``blcls``): type 1 -> first half of the experts."""
    n = weights.shape[-1]
    types = types.view(-1, 1)
    own = torch.cat(((types == 1).repeat(1, n // 2), (types == 0).repeat(1, n // 2)), dim=-1)
    z = (weights.sum(dim=1) * torch.where(own, 1.0 + alpha, 1.0 - alpha)).flatten()
    return z.float().var() / (z.float().mean() ** 2 + 1e-10)


def test_localized_balance_matches_loramoe_code():
    routing = routing_of(torch.randn(4, 6, 4))
    groups = torch.tensor([0, 1, 1, 0])
    got = localized_balance_loss(routing, None, groups, num_groups=2, delta=0.1)
    torch.testing.assert_close(got, loramoe_reference(routing.weights, 1 - groups, 0.1))
    with pytest.raises(ValueError, match="group_ids"):
        localized_balance_loss(routing, None, None, num_groups=2, delta=0.1)


LOSSES = {
    "importance": lambda r, m: importance_loss(r, m),
    "entropy": lambda r, m: entropy_loss(r, m),
    "localized": lambda r, m: localized_balance_loss(r, m, torch.tensor([0, 1, 1]), num_groups=2, delta=0.2),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_ignore_padding(name):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])  # row 2: all padding
    poisoned = logits.clone()
    poisoned[mask == 0] = torch.tensor([30.0, -30.0, 0.0, 0.0])
    fn = LOSSES[name]
    torch.testing.assert_close(fn(routing_of(poisoned, k=2), mask), fn(routing_of(logits, k=2), mask))
    if name != "localized":  # real tokens only == the unpadded tokens on their own
        real = torch.cat([logits[0, :4], logits[1]])
        torch.testing.assert_close(fn(routing_of(logits, k=2), mask), fn(routing_of(real, k=2), None))
    else:  # the all-padding example counts nowhere: same as the batch without it
        trimmed = localized_balance_loss(routing_of(logits[:2], k=2), mask[:2], torch.tensor([0, 1]), 2, 0.2)
        torch.testing.assert_close(fn(routing_of(logits, k=2), mask), trimmed)


def test_group_ids_reach_the_localized_loss_in_the_model():
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, top_k=2, r=4,
        aux_loss_coef=0.0, z_loss_coef=0.0, localized_balance_coef=1.0, importance_loss_coef=0.5,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config)
    model.train()
    batch = make_batch("llama", pad=2)
    a = model(**batch, group_ids=torch.tensor([0, 1])).aux_loss
    b = model(**batch, group_ids=torch.tensor([1, 1])).aux_loss
    assert a > 0 and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="group_ids"):
        model(**batch)
    model.eval()
    assert model(**batch).get("aux_loss") is None  # no loss, so no labels needed


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
