"""Cosine gate of X-MoE (Chi et al. 2022), against representation collapse."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import check_int, check_number
from .base import Router
from .top_k import TopKRouter

# Upper bound of the learned logit scale 1/tau (tau >= 0.01), as in CLIP and Tutel's cosine gate.
MAX_LOGIT_SCALE = math.log(100.0)


class CosineRouter(TopKRouter):
    """``s_e = cos(W_p x, E_e) / tau``, then top-k as Mixtral (the ``top_k`` gate's rule and options).

    ``W_p`` (``weight``, ``[d_r, d]``) projects the token to a low-dimensional routing space
    (``cosine_dim`` = d_r); the expert embeddings ``E`` (``[N, d_r]``) and the projection are both
    L2-normalised, so the score is a cosine in [-1, 1], divided by a learned temperature
    ``tau`` (stored as ``log(1/tau)``, clamped at tau >= 0.01). Routing in a small space with
    normalised scores keeps the router from collapsing the token representations onto the
    expert embeddings (X-MoE). Extra cost: a ``[d -> d_r]`` and a ``[d_r -> N]`` GEMM.
    """

    takes_noise = False  # its scores are cosines

    def __init__(self, in_features: int, num_experts: int, top_k: int, config) -> None:
        super().__init__(in_features, num_experts, top_k, config)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, config.cosine_dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)  # X-MoE's init
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.cosine_init_temperature)))

    @classmethod
    def weight_rows(cls, num_experts: int, top_k: int, config: Any) -> int:
        return config.cosine_dim  # W_p: the projection into the routing space

    @classmethod
    def check_options(cls, config: Any) -> None:
        super().check_options(config)
        check_int("MoPEConfig", "cosine_dim", config.cosine_dim, low=1)
        check_number(
            "MoPEConfig",
            "cosine_init_temperature",
            config.cosine_init_temperature,
            low=0.01,
            why="(the learned temperature is clamped there)",
        )

    def score(self, x: torch.Tensor) -> torch.Tensor:
        projected = Router.score(self, x)  # W_p x, with the base class's training-only jitter
        cosine = F.normalize(projected, dim=-1) @ F.normalize(self.expert_embeddings.float(), dim=-1).T
        return cosine * self.log_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cosine_dim={self.weight.shape[0]}"
