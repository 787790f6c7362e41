"""Adding a gate: a class defined here, one registry line, and the whole library runs it.

The worked example of docs/gates/adding_a_gate.md. ``RoundRobinRouter`` lives only in this file;
it is registered with ``ROUTERS`` for the test's duration and then goes through the config's
validation (its own checks name the field), a forward on a tiny Llama, a training step, and a save
and reload with PEFT, with no other change to the library.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

import mope
from mope.layer import MoPELayer
from mope.routing import Router, Routing, RoutingInputs


class RoundRobinRouter(Router):
    """Position t of each sequence uses experts ``t k, t k + 1, ..., t k + k - 1`` (mod N), weight 1/k each.

    A fixed, position-based spread of the experts: it reads no hidden state, so it has no scoring
    weight (``weight_rows`` gives None) and overrides ``decide`` instead of ``gate``.
    """

    schedules_top_k = False  # k sets the rotation (it must divide N): a schedule may not change it

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> None:
        return None  # nothing to learn

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        routed = config.num_experts - config.num_shared_experts
        if routed % config.top_k:
            raise ValueError(
                f"MoPEConfig.top_k={config.top_k} must divide the routed experts ({routed}) with "
                "router='round_robin', so that every expert serves the same share of positions"
            )
        if config.routing_level != "token":
            raise ValueError("MoPEConfig.routing_level must be 'token' with router='round_robin': it routes positions")

    def decide(self, x: torch.Tensor, inputs: RoutingInputs) -> Routing:
        if inputs.cache_step:
            raise ValueError("router='round_robin' needs whole sequences: a KV-cached step does not know its positions")
        k, n = self.top_k, self.num_experts
        positions = torch.arange(x.shape[-2], device=x.device)
        chosen = (positions[:, None] * k + torch.arange(k, device=x.device)) % n  # [seq, k]
        weights = torch.zeros(x.shape[-2], n, device=x.device).scatter(-1, chosen, 1.0 / k)
        weights = weights.expand(*x.shape[:-1], n).contiguous()
        return Routing(weights=weights, probs=weights, logits=torch.zeros_like(weights), load=weights)


@pytest.fixture(autouse=True)
def round_robin_gate(monkeypatch):
    monkeypatch.setitem(mope.routing.ROUTERS, "round_robin", RoundRobinRouter)  # the one registry line


def round_robin_config(**overrides) -> mope.MoPEConfig:
    kwargs = {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "num_experts": 4, "top_k": 2}
    # the gate has nothing to balance: its load is fixed, so the router losses are off
    kwargs.update(router="round_robin", aux_loss_coef=0.0, z_loss_coef=0.0, init_weights=False)
    return mope.MoPEConfig(**{**kwargs, **overrides})


def layers_of(model) -> list[MoPELayer]:
    return [m for m in model.modules() if isinstance(m, MoPELayer)]


def test_the_config_knows_the_gate_and_its_checks_name_the_field(monkeypatch):
    assert round_robin_config().router == "round_robin"
    with pytest.raises(ValueError, match=r"^MoPEConfig\.top_k=3 must divide the routed experts \(4\)"):
        round_robin_config(top_k=3)
    with pytest.raises(ValueError, match=r"^MoPEConfig\.top_k=2 must divide the routed experts \(3\)"):
        round_robin_config(num_shared_experts=1)
    with pytest.raises(ValueError, match=r"^MoPEConfig\.routing_level must be 'token' with router='round_robin'"):
        round_robin_config(routing_level="sequence")
    mope.MoPEConfig(top_k=3)  # its checks bind only when it is the chosen gate
    monkeypatch.delitem(mope.routing.ROUTERS, "round_robin")
    with pytest.raises(ValueError, match=r"^MoPEConfig\.router='round_robin' is unknown; choose one of \["):
        round_robin_config()


def test_every_registered_gate_is_asked_to_check_its_options(monkeypatch):
    seen = []
    monkeypatch.setattr(RoundRobinRouter, "check_options", classmethod(lambda cls, config: seen.append(config)))
    config = mope.MoPEConfig(router="dense")
    assert seen == [config]  # asked although another gate is chosen: a gate's own fields are always checked


def test_forward_uses_the_experts_of_each_position():
    base = make_model("llama")
    batch = make_batch("llama")
    with torch.no_grad():
        want_base = base(**batch).logits
    model = get_peft_model(base, round_robin_config(init_weights=True))
    with torch.no_grad():  # init_weights=True: zero B matrices, the base model exactly
        torch.testing.assert_close(model(**batch).logits, want_base, rtol=0, atol=0)

    model = get_peft_model(make_model("llama"), round_robin_config())
    layer = layers_of(model)[0]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        weights = layer.mope_router["default"](x).weights
        for t, experts in enumerate([(0, 1), (2, 3), (0, 1), (2, 3), (0, 1)]):
            want = torch.zeros(4).index_fill(0, torch.tensor(experts), 0.5)
            assert torch.equal(weights[0, t], want) and torch.equal(weights[1, t], want)
        bank = layer.mope_experts["default"]
        torch.testing.assert_close(layer(x), bank(x, layer.base_layer(x), weights))
        assert torch.isfinite(model(**batch).logits).all()


def test_trains_saves_and_reloads(tmp_path):
    model = get_peft_model(make_model("llama"), round_robin_config())
    assert not [name for name, _ in model.named_parameters() if "mope_router" in name]  # no router weight
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = layers_of(model)[0].mope_experts["default"].lora_B.detach().clone()
    out = model(**make_batch("llama"))
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss)
    assert not torch.equal(layers_of(model)[0].mope_experts["default"].lora_B, before)

    model.eval()
    batch = make_batch("llama", pad=2)
    with torch.no_grad():
        want = model(**batch).logits
    mope.save_pretrained(model, tmp_path / "bundle")
    assert not [key for key in get_peft_model_state_dict(model) if "mope_router" in key]
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bundle")
    assert isinstance(layers_of(loaded)[0].mope_router["default"], RoundRobinRouter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)


class DomainRouter(Router):
    """Expert ``domain_ids[b] mod N`` for every token of example b: a gate that reads a forward input of its own."""

    schedules_top_k = False

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> None:
        return None

    def decide(self, x: torch.Tensor, inputs: RoutingInputs) -> Routing:
        domains = inputs.captured["domain_ids"] % self.num_experts  # the new input, as the call passed it
        weights = torch.nn.functional.one_hot(domains, self.num_experts).float()
        weights = weights.view(-1, *([1] * (x.dim() - 2)), self.num_experts).expand(*x.shape[:-1], -1)
        return Routing(weights=weights, probs=weights, logits=torch.zeros_like(weights), load=weights)


def test_a_new_forward_input_is_one_captured_input_line(monkeypatch):
    from mope.routing import context

    monkeypatch.setitem(mope.routing.ROUTERS, "domain", DomainRouter)
    line = context.CapturedInput("domain_ids", consumed=True)  # the one line: consumed, the base model never sees it
    table = (*context.CAPTURED_INPUTS, line)
    monkeypatch.setattr(context, "CAPTURED_INPUTS", table)  # as if added in context.py (tuner.py imports the table)
    monkeypatch.setattr(mope.tuner, "CAPTURED_INPUTS", table)
    config = round_robin_config(router="domain", top_k=1)
    model = get_peft_model(make_model("llama"), config).eval()
    seen = []
    layers_of(model)[0].mope_router["default"].register_forward_hook(lambda m, a, out: seen.append(out.weights))
    batch = make_batch("llama")
    with torch.no_grad():
        model(input_ids=batch["input_ids"], domain_ids=torch.tensor([3, 1]))
    assert seen[0][0].argmax(-1).tolist() == [3] * 8 and seen[0][1].argmax(-1).tolist() == [1] * 8
