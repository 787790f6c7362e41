"""Each gate checks the MoPEConfig fields it owns (``Router.check_options``) and its constraints on the
rest of the config when chosen (``Router.check_chosen``); shared options live in mope.routing.options.

A gate's option is refused whichever router is chosen (the value is saved with the bundle), and it is
the owning gate that refuses it: with the owner unregistered, the same value passes.
"""

from __future__ import annotations

import math

import pytest

import mope
from mope.routing import ROUTERS

# field -> (bad value, the gate that owns the field)
GATE_OPTIONS = {
    "top_k_order": ("topk", "top_k"),
    "router_noise": (1, "top_k"),
    "allow_noncausal_routing": ("yes", "expert_choice"),
    "sinkhorn_iterations": (0, "balanced"),
    "top_p": (1.5, "top_p"),
    "dselect_gamma": (math.inf, "dselect_k"),
    "cosine_dim": (0, "cosine"),
    "cosine_init_temperature": (0.001, "cosine"),
    "hash_seed": (-1, "hash"),
    "soft_merge_lora": ("outputs", "soft_merge"),
    "slots_per_expert": (True, "soft_tokens"),
}


@pytest.mark.parametrize("field", list(GATE_OPTIONS))
def test_a_gate_option_is_refused_by_its_gate_whichever_router_is_chosen(field, monkeypatch):
    bad, owner = GATE_OPTIONS[field]
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field}"):
        mope.MoPEConfig(router="dense", **{field: bad})
    config = mope.MoPEConfig(router="dense")
    setattr(config, field, bad)
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field}"):
        ROUTERS[owner].check_options(config)
    owner_class = ROUTERS[owner]
    for name, gate in list(ROUTERS.items()):  # unregister the owner and the gates built on it
        if issubclass(gate, owner_class):
            monkeypatch.delitem(ROUTERS, name)
    mope.MoPEConfig(router="dense", **{field: bad})  # nobody else reads the field: accepted


# chosen gate -> (config overrides that only this gate refuses, the field named)
CHOSEN_CONSTRAINTS = {
    "hierarchical": ({"num_experts": 6, "num_groups": 4}, "num_groups"),
    "hash": ({"routing_level": "sequence"}, "routing_level"),
    "arrow": ({"expert_type": "adapter"}, "expert_type"),
    "soft_merge": ({"routing_level": "token"}, "routing_level"),
    "soft_tokens": ({"task_type": "CAUSAL_LM"}, "router"),
}


@pytest.mark.parametrize("gate", list(CHOSEN_CONSTRAINTS))
def test_cross_field_constraints_apply_to_the_chosen_gate_only(gate):
    overrides, field = CHOSEN_CONSTRAINTS[gate]
    config = mope.MoPEConfig(router="top_k", **overrides)  # fine for another gate
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field}"):
        ROUTERS[gate].check_chosen(config)
    with pytest.raises(ValueError, match=rf"^MoPEConfig\.{field}"):
        mope.MoPEConfig(router=gate, **overrides)


@pytest.mark.parametrize("gate", sorted(ROUTERS))
def test_router_noise_is_refused_by_gates_that_add_none(gate):
    # dense, top_p, expert_choice, ... accepted router_noise=True and trained without noise
    options = {"routing_level": "task", "num_tasks": 2} if gate in ("soft_merge", "fixed_task") else {}
    options |= {"task_type": "SEQ_CLS"} if gate == "soft_tokens" else {}
    if ROUTERS[gate].takes_noise:
        assert mope.MoPEConfig(router=gate, router_noise=True, **options).router_noise is True
    else:
        with pytest.raises(ValueError, match=rf"^MoPEConfig\.router_noise: router='{gate}' adds no noise"):
            mope.MoPEConfig(router=gate, router_noise=True, **options)
    assert {name for name, g in ROUTERS.items() if g.takes_noise} == {"top_k", "switch"}


def test_shared_options_are_checked_for_every_gate():
    for gate in ROUTERS:
        with pytest.raises(ValueError, match=r"^MoPEConfig\.router_temperature"):
            mope.MoPEConfig(router=gate, router_temperature=-1.0)
        with pytest.raises(ValueError, match=r"^MoPEConfig\.num_groups"):
            mope.MoPEConfig(router=gate, num_groups=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"soft_merge_lora": "outputs"}, "soft_merge_lora"),
        ({"slots_per_expert": 0}, "slots_per_expert"),
        ({"slots_per_expert": True}, "slots_per_expert"),
        ({"router": "soft_merge"}, "routing_level"),  # LoRA merges per sequence
        ({"router": "soft_merge", "routing_level": "sequence", "num_shared_experts": 1}, "num_shared_experts"),
        ({"router": "soft_tokens", "routing_level": "sequence"}, "routing_level"),
        ({"router": "soft_tokens", "expert_type": "ia3"}, "expert_type"),
        ({"router": "soft_tokens", "num_shared_experts": 1}, "num_shared_experts"),
        ({"router": "soft_tokens", "router_blocks": ["mlp"]}, "router_blocks"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MoPEConfig.{field}"):
        mope.MoPEConfig(num_experts=4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"capacity_factor": float("inf")}, "capacity_factor"),
        ({"capacity_factor": "1"}, "capacity_factor"),
        ({"capacity_factor": 1.0, "router": "dense"}, "capacity_factor"),
        ({"capacity_policy": "fifo"}, "capacity_policy"),
        ({"top_k_order": "topk"}, "top_k_order"),
        ({"router_noise": 1}, "router_noise"),
        ({"allow_noncausal_routing": "yes"}, "allow_noncausal_routing"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
    ],
)
def test_invalid_sparse_gate_options(kwargs, field):
    with pytest.raises(ValueError, match=f"MoPEConfig.{field}"):
        mope.MoPEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"router_temperature": 0}, "router_temperature"),
        ({"router_temperature": float("inf")}, "router_temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_groups": 0}, "num_groups"),
        ({"dselect_gamma": -1.0}, "dselect_gamma"),
        ({"cosine_dim": 0}, "cosine_dim"),
        ({"cosine_init_temperature": 0.001}, "cosine_init_temperature"),
        ({"hash_seed": -1}, "hash_seed"),
        ({"router": "hash", "routing_level": "sequence"}, "routing_level"),
        ({"router": "cosine", "router_noise": True}, "router_noise"),
        ({"routing_level": "paragraph"}, "routing_level"),
        ({"routing_level": "task"}, "num_tasks"),
        ({"num_tasks": 3}, "num_tasks"),
        ({"importance_loss_coef": -1.0}, "importance_loss_coef"),
        ({"entropy_loss_coef": math.nan}, "entropy_loss_coef"),
        ({"localized_balance_coef": -0.1}, "localized_balance_coef"),
        ({"localized_balance_delta": 1.0}, "localized_balance_delta"),
        ({"router_schedule_steps": -1}, "router_schedule_steps"),
        ({"router_schedule_steps": 10}, "router_schedule_steps"),
        ({"router_schedule_start_top_k": 3}, "router_schedule_start"),
        ({"router_schedule_steps": 10, "router_schedule_start_top_k": 9}, "router_schedule_start_top_k"),
        ({"router_schedule_steps": 10, "router_schedule_start_temperature": 0.0}, "router_schedule_start_temperature"),
        ({"router_schedule_steps": 10, "router_schedule_start_top_k": 4, "router": "hash"}, "start_top_k"),
        ({"router_schedule_steps": 10, "router_schedule_start_top_k": 4, "router": "dense"}, "start_top_k"),
        (
            {
                "router_schedule_steps": 10,
                "router_schedule_start_top_k": 4,
                "router": "expert_choice",
                "capacity_factor": 1.0,
            },
            "start_top_k",
        ),
        ({"router_schedule_counter": "epoch"}, "router_schedule_counter"),
    ],
)
def test_invalid_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        mope.MoPEConfig(num_experts=4, top_k=2, **kwargs)
