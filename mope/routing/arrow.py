"""Arrow routing (Ostapenko et al. 2024, "Towards modular LLMs by building and reusing a library of
LoRAs"): a training-free gate whose scores come from the LoRA experts' own weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .top_k import TopKRouter


class ArrowRouter(TopKRouter):
    """``s_e = |v_e . x|``, ``v_e`` the top right singular vector of ``dW_e = B_e^T A_e``; then top-k.

    Why it works without training: a LoRA changes the layer's output most for inputs along
    ``v_e`` (``|dW_e x|`` is largest there), so ``|v_e . x|`` says how much expert e has to say
    about this token. A singular vector's sign is arbitrary, hence the absolute value. The k
    largest scores are softmaxed and renormalised (Arrow's rule; ``router_temperature`` divides
    the scores first); capacity options work as for ``top_k``.

    The prototypes ``v_e`` live in ``weight`` (``[N, d_in]``), a *buffer*: nothing here trains,
    yet it is saved in the bundle under the router's usual name, so a reloaded model routes
    identically. They are zero (uniform routing) until :func:`init_arrow` computes them from the
    experts; ``mope.from_lora_adapters`` does that for you.
    """

    weight_trains = False  # a zero buffer until init_arrow fills it with the experts' prototypes
    takes_noise = False  # nothing to train

    @classmethod
    def check_chosen(cls, config: Any) -> None:
        """Arrow needs LoRA experts (prototypes come from B^T A) and has nothing to learn."""
        super().check_chosen(config)
        if config.expert_type != "lora":
            raise ValueError(
                f"MoPEConfig.expert_type={config.expert_type!r} does not work with router='arrow': Arrow's "
                "prototypes are singular vectors of LoRA updates B^T A; use expert_type='lora'"
            )
        if config.routing_level == "task":
            raise ValueError("MoPEConfig.routing_level='task' does not work with router='arrow': Arrow routes by input")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return super().score(x).abs()


def top_right_singular_vectors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``[N, d_in]``: the top right singular vector of each ``B_e^T A_e`` (sign arbitrary, zero for a zero update).

    Never forms the ``[d_out, d_in]`` update: with ``A_e^T = Q R`` (thin QR),
    ``dW_e = B_e^T R^T Q^T``, so its right singular vectors are ``Q`` times those of the small
    ``[d_out, r]`` matrix ``B_e^T R^T``. Exact (no power iteration), ``O((d_in + d_out) r^2)``.
    """
    a, b = lora_a.detach().double(), lora_b.detach().double()
    q, r = torch.linalg.qr(a.transpose(1, 2))  # [N, d_in, r], [N, r, r]
    small = b.transpose(1, 2) @ r.transpose(1, 2)  # [N, d_out, r]
    _, s, vh = torch.linalg.svd(small, full_matrices=False)
    prototypes = (q @ vh[:, 0, :, None]).squeeze(-1)
    prototypes[s[:, 0] <= 0] = 0.0  # an expert that changes nothing has no direction
    return prototypes.to(lora_a.dtype)


@torch.no_grad()
def init_arrow(model: nn.Module, adapter_name: str = "default") -> int:
    """Fill every Arrow router of ``adapter_name`` with its module's expert prototypes; returns how many.

    Call it after changing the experts' weights (``mope.from_lora_adapters`` calls it once the
    adapters are copied in). Shared experts are not routed, so they get no prototype.
    """
    filled = 0
    for layer in model.modules():  # MoPE layers: modules with a router table (the layer imports routing)
        routers = getattr(layer, "mope_router", None)
        if not isinstance(routers, nn.ModuleDict) or adapter_name not in routers:
            continue  # block-level routing: followers use their leader's router
        router = layer.mope_router[adapter_name]
        if not isinstance(router, ArrowRouter):
            continue
        bank = layer.mope_experts[adapter_name]
        routed = router.num_experts
        prototypes = top_right_singular_vectors(bank.lora_A[:routed], bank.lora_B[:routed])
        router.weight.copy_(prototypes.to(router.weight.dtype))
        filled += 1
    if not filled:
        raise ValueError(f"init_arrow: adapter '{adapter_name}' has no router='arrow' layers in this model")
    return filled
