"""DeepSpeed ZeRO-3: each MoPE layer gathers its routers' partitioned weights with its own.

ZeRO-3 gathers a module's partitioned parameters before its forward and again before its backward
by hooking the tensors the module returns. A router returns a ``Routing`` (a dataclass), in which
DeepSpeed finds no tensor, so its weight was released again by the time its gradient arrived
(``RuntimeError: The size of tensor a (0) must match the size of tensor b (128)`` in
``AccumulateGrad``). The layer returns a tensor, so its hooks fire: DeepSpeed's
``register_external_parameter`` makes them gather the router weights too. The tuner does this for
every adapter injected while ZeRO-3 is on (``transformers.Trainer``, TRL, accelerate with a ZeRO-3
config all set transformers' ``is_deepspeed_zero3_enabled``); the recipe loop calls it itself.
"""

from __future__ import annotations

from torch import nn


def gather_routers_with_their_layers(model: nn.Module) -> None:
    """Register every MoPE router's parameters as external parameters of the layer that holds it."""
    from deepspeed import zero  # deepspeed.zero is an attribute, not a module

    for module in model.modules():
        routers = getattr(module, "mope_router", None)
        for parameter in routers.parameters() if isinstance(routers, nn.Module) else ():
            zero.register_external_parameter(module, parameter)
