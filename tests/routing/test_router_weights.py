"""The router's scoring weight: created once, in its final shape, by the base class; bundles unchanged.

``Router.weight_rows`` gives the weight's shape (None: no weight), ``Router.init_weight`` its
initialisation and ``Router.weight_trains`` whether it is a Parameter or a zero buffer. The tensor
names and shapes below were read from the code before these hooks existed (commit b6b1396, where
several gates deleted or replaced the base class's weight): a bundle saved then must still load.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from torch.nn.modules import module as torch_module

import mope
from mope.layer import MoPELayer
from mope.routing import ROUTERS

# variant -> (model, config overrides, router parameters {name: shape}, router buffers {name: shape}),
# for a router of a 64-wide projection with 4 experts and top_k=2 (3 tasks at routing_level='task').
ROUTER_TENSORS = {
    "top_k": ("llama", {}, {"weight": (4, 64)}, {}),
    "top_k_noise": ("llama", {"router_noise": True}, {"weight": (4, 64), "noise_weight": (4, 64)}, {}),
    "top_k_task": ("llama", {"routing_level": "task", "num_tasks": 3}, {"weight": (4, 3)}, {}),
    "dense": ("llama", {"router": "dense"}, {"weight": (4, 64)}, {}),
    "switch": ("llama", {"router": "switch"}, {"weight": (4, 64)}, {}),
    "expert_choice": ("llama", {"router": "expert_choice", "allow_noncausal_routing": True}, {"weight": (4, 64)}, {}),
    "balanced": ("llama", {"router": "balanced"}, {"weight": (4, 64)}, {}),
    "top_p": ("llama", {"router": "top_p"}, {"weight": (4, 64)}, {}),
    "hierarchical": ("llama", {"router": "hierarchical", "num_groups": 2}, {"weight": (6, 64)}, {}),
    "dselect_k": ("llama", {"router": "dselect_k"}, {"weight": (6, 64)}, {}),
    "dselect_k_n6": ("llama", {"router": "dselect_k", "num_experts": 6, "top_k": 3}, {"weight": (12, 64)}, {}),
    "cosine": (
        "llama",
        {"router": "cosine", "cosine_dim": 8},
        {"weight": (8, 64), "expert_embeddings": (4, 8), "log_scale": ()},
        {},
    ),
    "hash": ("llama", {"router": "hash", "aux_loss_coef": 0.0, "z_loss_coef": 0.0}, {}, {}),
    "arrow": ("llama", {"router": "arrow"}, {}, {"weight": (4, 64)}),
    "soft_merge": ("llama", {"router": "soft_merge", "routing_level": "sequence"}, {"weight": (4, 64)}, {}),
    "soft_tokens": ("bert", {"router": "soft_tokens"}, {"weight": (4, 64)}, {}),
    "soft_tokens_p2": ("bert", {"router": "soft_tokens", "slots_per_expert": 2}, {"weight": (8, 64)}, {}),
}


def test_every_gate_has_a_row():
    assert {ROUTER_TENSORS[v][1].get("router", "top_k") for v in ROUTER_TENSORS} == set(ROUTERS)


def build(variant: str):
    model_name, overrides, _, _ = ROUTER_TENSORS[variant]
    task = "SEQ_CLS" if model_name == "bert" else "CAUSAL_LM"
    targets = ["query", "value"] if model_name == "bert" else ["q_proj", "v_proj"]
    kwargs = {"task_type": task, "target_modules": targets, "num_experts": 4, "top_k": 2, "r": 4}
    config = mope.MoPEConfig(**{**kwargs, "init_weights": False, **overrides})
    return model_name, get_peft_model(make_model(model_name), config)


def routers_of(model) -> list:
    return [m.mope_router["default"] for m in model.modules() if isinstance(m, MoPELayer)]


@pytest.mark.parametrize("variant", list(ROUTER_TENSORS))
def test_router_tensor_names_and_shapes_are_those_bundles_hold(variant):
    _, model = build(variant)
    _, _, parameters, buffers = ROUTER_TENSORS[variant]
    routers = routers_of(model)
    assert len(routers) == 4
    for router in routers:
        assert {name: tuple(p.shape) for name, p in router.named_parameters()} == parameters
        assert {name: tuple(b.shape) for name, b in router.named_buffers()} == buffers
    saved = {key for key in get_peft_model_state_dict(model) if ".mope_router." in key}
    assert {key.rsplit(".mope_router.", 1)[1] for key in saved} == set(parameters) | set(buffers)
    assert len(saved) == 4 * len(set(parameters) | set(buffers))


@pytest.mark.parametrize("variant", list(ROUTER_TENSORS))
def test_the_weight_is_registered_once_and_never_deleted(variant):
    """No gate deletes the base class's weight or replaces it: 'weight' is registered once, or never."""
    registered = []

    def record(module, name, tensor):
        if isinstance(module, mope.Router):
            registered.append((id(module), name))

    hooks = [
        torch_module.register_module_parameter_registration_hook(record),
        torch_module.register_module_buffer_registration_hook(record),
    ]
    try:
        _, model = build(variant)
    finally:
        for hook in hooks:
            hook.remove()
    has_weight = "weight" in ROUTER_TENSORS[variant][2] or "weight" in ROUTER_TENSORS[variant][3]
    for router in routers_of(model):
        assert registered.count((id(router), "weight")) == (1 if has_weight else 0)
        assert hasattr(router, "weight") == has_weight


@pytest.mark.parametrize("variant", ["hierarchical", "dselect_k", "cosine", "hash", "arrow", "soft_tokens_p2"])
def test_a_bundle_saves_and_reloads_identically(variant, tmp_path):
    model_name, model = build(variant)
    model.eval()
    batch = make_batch(model_name, pad=2)
    with torch.no_grad():
        want = model(**batch).logits
    mope.save_pretrained(model, tmp_path)
    loaded = PeftModel.from_pretrained(make_model(model_name), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)


def test_weight_rows_and_init_weight_shape_and_initialise_the_weight():
    config = mope.MoPEConfig(num_experts=4, top_k=2, router="dselect_k", router_init_std=1.0, dselect_gamma=2.0)
    router = ROUTERS["dselect_k"](16, 4, 2, config)
    assert ROUTERS["dselect_k"].weight_rows(4, 2, config) == router.weight.shape[0] == 2 * 2 + 2
    z, alpha = router.weight[:4], router.weight[4:]
    assert z.abs().max() <= 2.0 / 100  # DSelect-k's own init: selectors start near uniform
    assert alpha.abs().max() > 0.1  # the config's 'normal' init, std 1
    zeros = ROUTERS["dselect_k"](16, 4, 2, mope.MoPEConfig(num_experts=4, top_k=2, router_init="zeros"))
    assert not zeros.weight.any()
    arrow = ROUTERS["arrow"](16, 4, 2, mope.MoPEConfig(num_experts=4, top_k=2, router="arrow"))
    assert not arrow.weight.any() and not arrow.weight.requires_grad  # a zero buffer until init_arrow
    hashed = ROUTERS["hash"](16, 4, 2, mope.MoPEConfig(num_experts=4, top_k=2, router="hash"))
    assert ROUTERS["hash"].weight_rows(4, 2, mope.MoPEConfig()) is None and not list(hashed.parameters())
    assert "in_features=16" in repr(hashed) and "in_features=16" in repr(arrow)
