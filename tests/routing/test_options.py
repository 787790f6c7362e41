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
    "cosine": ({"router_noise": True}, "router_noise"),
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
