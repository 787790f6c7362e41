"""``MoPEConfig``: the PEFT config of a mixture of parameter-efficient experts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from .experts import EXPERT_BANKS
from .registration import add_peft_type_member
from .routing import ROUTER_INITS, ROUTERS

MOPE_VERSION = "0.1.0"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MoPEConfig(PeftConfig):
    """Configuration of a MoPE adapter: which modules get experts, how many, and how they are gated.

    Targeting fields (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``modules_to_save``) have exactly PEFT's semantics (see ``LoraConfig``).
    Every invalid value raises ``ValueError`` naming the field, before any model is touched.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (list: exact name or suffix match), a regex (str) or 'all-linear'. "
            "None picks PEFT's LoRA defaults for known architectures."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (list) or a regex (str) that never get experts."}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Read by PEFT's matching code; mope targets modules only, keep None."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (PEFT semantics)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers', 'h'), used with layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. 'classifier')."}
    )
    num_experts: int = field(default=8, metadata={"help": "Routed experts per adapted module (N)."})
    top_k: int = field(default=2, metadata={"help": "Experts each token uses (sparse gates); 1 <= top_k <= N."})
    r: int = field(default=8, metadata={"help": "LoRA rank of each expert."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: delta = (alpha / r) * B A x."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the experts' input; one mask per layer shared by all experts."},
    )
    expert_type: str = field(default="lora", metadata={"help": f"Expert kind, one of {sorted(EXPERT_BANKS)}."})
    router: str = field(default="top_k", metadata={"help": f"Gate strategy, one of {sorted(ROUTERS)}."})
    router_jitter: float = field(
        default=0.0,
        metadata={"help": "Training-only multiplicative noise U(1-eps, 1+eps) on the router input (Switch); 0 = off."},
    )
    router_init: str = field(default="normal", metadata={"help": f"Router weight init, one of {sorted(ROUTER_INITS)}."})
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the 'normal' router init."})
    aux_loss_coef: float = field(
        default=0.01,
        metadata={"help": "Weight of the Switch/GShard load-balancing loss (mean over adapted modules)."},
    )
    z_loss_coef: float = field(
        default=0.001, metadata={"help": "Weight of the ST-MoE router z-loss (mean over adapted modules)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: expert B matrices start at zero, so the wrapped model equals the base model. "
            "False: random, non-identity init (for tests)."
        },
    )
    base_model_type: str | None = field(
        default=None,
        metadata={"help": "model_type of the base model the adapter was made for; filled in automatically."},
    )
    mope_version: str = field(default=MOPE_VERSION, metadata={"help": "mope version that wrote this config."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type_member()
        self._check()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def _check(self) -> None:
        for name in ("num_experts", "top_k", "r"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MoPEConfig.{name} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoPEConfig.top_k ({self.top_k}) must not exceed MoPEConfig.num_experts ({self.num_experts})"
            )
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"MoPEConfig.lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        for name in ("lora_dropout", "router_jitter"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise ValueError(f"MoPEConfig.{name} must be a number in [0, 1), got {value!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "router_init_std"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"MoPEConfig.{name} must be a number >= 0, got {value!r}")
        for name, table in (("router", ROUTERS), ("router_init", ROUTER_INITS), ("expert_type", EXPERT_BANKS)):
            value = getattr(self, name)
            if value not in table:
                raise ValueError(f"MoPEConfig.{name}={value!r} is unknown; choose one of {sorted(table)}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"MoPEConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.target_parameters:
            raise ValueError("MoPEConfig.target_parameters is not supported: mope adapts modules, not parameters")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("MoPEConfig.layers_pattern needs MoPEConfig.layers_to_transform to be set")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("MoPEConfig.layers_to_transform cannot be combined with a regex target_modules")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> MoPEConfig:
        """Load ``adapter_config.json`` and remember the bundle's folder.

        PEFT loads the config before it touches the model, so this is where a local bundle's
        tensor file is opened (header only) and checked; the model-dependent checks run after
        injection, and a failure there restores the model (see ``MoPEModel.inject_adapter``).
        """
        from .bundle import read_bundle_header

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if os.path.isdir(folder):
            config.bundle_tensor_shapes = read_bundle_header(folder)
            config.bundle_path = folder
        return config
