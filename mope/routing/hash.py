"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed, non-learned baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from ..checks import check_int
from .base import Router, Routing, RoutingInputs

# A Mersenne prime for the universal hash ((a * id + b) mod P) mod N; ids * a stay below 2^63.
HASH_PRIME = 2**31 - 1


class HashRouter(Router):
    """Token id t goes to expert ``((a t + b) mod P) mod N``, weight 1; a, b drawn from ``hash_seed``.

    No parameters and no learning: a baseline that balances load by construction over a
    vocabulary (Hash Layers), and a check of what a learned gate adds. The same token always
    goes to the same expert, in every layer; ``top_k`` is ignored (one expert per token). Needs
    the token ids aligned with the layer's tokens (``input_ids``; ``decoder_input_ids`` in a
    decoder): layers fed ``inputs_embeds``, or an encoder-decoder decoder called with ``labels``
    only, raise a ValueError. Token level only. The z-loss of its constant logits is a constant:
    set ``z_loss_coef=0`` and ``aux_loss_coef=0``, there is nothing to train.
    """

    schedules_top_k = False

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        generator = torch.Generator().manual_seed(config.hash_seed)
        self.multiplier = int(torch.randint(1, HASH_PRIME, (1,), generator=generator))
        self.offset = int(torch.randint(0, HASH_PRIME, (1,), generator=generator))

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> None:
        return None  # nothing learned: the router has no weight

    @classmethod
    def check_options(cls, config: Any) -> None:
        check_int("MoPEConfig", "hash_seed", config.hash_seed, low=0, high=2**64 - 1, why="(torch's seed range)")

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        if config.routing_level != "token":
            raise ValueError(
                "MoPEConfig.routing_level must be 'token' with router='hash': hash routing reads token ids"
            )

    def expert_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        return ((token_ids.long() * self.multiplier + self.offset) % HASH_PRIME) % self.num_experts

    def decide(self, x: torch.Tensor, inputs: RoutingInputs) -> Routing:
        if inputs.token_ids is None or inputs.token_ids.shape != x.shape[:-1]:
            raise ValueError(
                "router='hash' routes by token id, but this layer got no token ids matching its tokens "
                f"(layer input {tuple(x.shape)}): pass input_ids (not inputs_embeds), and decoder_input_ids "
                "for an encoder-decoder decoder, or choose a learned gate."
            )
        expert = self.expert_of(inputs.token_ids.to(x.device))
        one_hot = F.one_hot(expert, self.num_experts).to(x.dtype)
        zeros = torch.zeros_like(one_hot)
        return Routing(weights=one_hot, probs=one_hot, logits=zeros, load=one_hot, chosen=expert.unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in_features={self.in_features}, a={self.multiplier}, b={self.offset}"
