"""``MoPEConfig``: the PEFT config of a mixture of parameter-efficient experts."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from packaging.version import Version
from peft import PeftConfig, TaskType
from peft.utils.constants import CONFIG_NAME

from .bundles.files import BundleHeader
from .bundles.upgrade import newer_than_this, read_config_file, read_json_object
from .checks import check_bool, check_choice, check_int, check_number, check_type, check_version
from .dispatch import DISPATCH_CHOICES
from .experts import ACTIVATIONS, EXPERT_BANKS
from .registration import PEFT_TYPE_NAME as PEFT_TYPE
from .registration import add_peft_type_member
from .routing import ROUTER_INITS, ROUTERS
from .routing.capacity import CAPACITY_POLICIES
from .routing.levels import ROUTING_LEVELS
from .routing.options import check_shared_options
from .routing.top_k import TOP_K_ORDERS
from .version import MOPE_VERSION

ADAPTER_PLACEMENTS = ("parallel", "series")


# Numbers and flags have checks of their own that say more (check_int, check_number, check_bool: with the
# range), and so have plain strings, which are all choices or versions (check_choice lists the choices).
NUMBERS_AND_FLAGS = {int, float, bool, type(None)}


@functools.cache
def typed_fields(config_cls: type) -> tuple[tuple[str, Any], ...]:
    """The fields of a container or optional-string type, with their type hints (PEFT's fields included)."""
    hints = typing.get_type_hints(config_cls)
    return tuple(
        (f.name, hints[f.name])
        for f in dataclasses.fields(config_cls)
        if hints[f.name] is not str and not set(typing.get_args(hints[f.name]) or (hints[f.name],)) <= NUMBERS_AND_FLAGS
    )


def pattern_matches(pattern: str, module_name: str) -> bool:
    """PEFT's ``rank_pattern`` rule: the regex matches the whole name or a dotted suffix of it."""
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


def lists_module(targets: str | Iterable[str] | None, module_name: str) -> bool:
    """PEFT's ``feedforward_modules`` rule: a regex matching the whole name, or a list of names or dotted suffixes."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def check_regex(what: str, pattern: str) -> None:
    """Refuse a pattern that does not compile, naming the field (``re.error`` would name none)."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"MoPEConfig.{what} {pattern!r} is not a valid regex: {error}") from error


def pattern_value(table: dict[str, int], module_name: str, default: int, field_name: str = "pattern") -> int:
    """The value of the first pattern in ``table`` matching ``module_name``, else ``default``.

    PEFT saves the config with its keys sorted, so a reloaded bundle takes the first match in sorted
    order: where that gives a module another value than the order given (two overlapping keys with
    different values, the wrong one first in sorted order: top_k 2 for 1, logits 0.026 off, silently),
    it is refused. A saved config's keys are sorted already: it always loads as it was saved.
    """
    matching = [(pattern, value) for pattern, value in table.items() if pattern_matches(pattern, module_name)]
    given, saved = (next(iter(order), (None, default)) for order in (matching, sorted(matching)))
    if given[1] != saved[1]:
        raise ValueError(
            f"MoPEConfig.{field_name}: keys {given[0]!r} ({given[1]}) and {saved[0]!r} ({saved[1]}) both match module "
            f"'{module_name}'; the first one given wins, but a saved config sorts its keys, so the reloaded bundle "
            f"would take {saved[1]}. Make them not overlap (or give the one you mean first in sorted order)."
        )
    return given[1]


@dataclass
class MoPEConfig(PeftConfig):
    """Configuration of a MoPE adapter: which modules get experts, how many, and how they are gated.

    Targeting fields (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``modules_to_save``) have exactly PEFT's semantics (see ``LoraConfig``).
    Every invalid value raises ``ValueError`` naming the field, before any model is touched: at
    construction, and again (:meth:`validate`) when ``get_peft_model`` or ``add_adapter`` uses the
    config, for fields assigned since. ``'all-linear'`` leaves out the head a task type trains whole
    (``TOKEN_CLS``'s ``classifier``, ``QUESTION_ANS``'s ``qa_outputs``); naming it is refused.
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
    num_experts: int = field(default=8, metadata={"help": "Experts per adapted module (N), shared experts included."})
    top_k: int = field(
        default=2,
        metadata={"help": "Routed experts each token uses (sparse gates); 1 <= top_k <= N - num_shared_experts."},
    )
    num_shared_experts: int = field(
        default=0,
        metadata={"help": "Experts every token uses with weight 1, besides the routed ones (DeepSeekMoE)."},
    )
    num_experts_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module num_experts, keyed by module-name regex (as PEFT's rank_pattern)."},
    )
    top_k_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module top_k, keyed by module-name regex."}
    )
    r: int = field(default=8, metadata={"help": "Rank of each LoRA expert; bottleneck size of adapter experts."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: delta = (alpha / r) * B A x."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the experts' input; one mask per layer shared by all experts."},
    )
    expert_type: str = field(default="lora", metadata={"help": f"Expert kind, one of {sorted(EXPERT_BANKS)}."})
    adapter_placement: str = field(
        default="parallel",
        metadata={"help": "Adapter experts: 'parallel' (on the module input, He et al.) or 'series' (on its output)."},
    )
    adapter_activation: str = field(
        default="relu", metadata={"help": f"Adapter experts' nonlinearity, one of {sorted(ACTIVATIONS)}."}
    )
    adapter_scaling: float = field(default=1.0, metadata={"help": "Adapter experts' output scale."})
    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "(IA)3 experts: modules whose input (not output) is scaled, e.g. ['down_proj'] (PEFT IA3)."},
    )
    router_blocks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Block-level routing (MixLoRA): module-name regexes of blocks (e.g. ['mlp']) whose adapted "
            "projections share one router; it runs once per block, on the input of the block's first adapted module."
        },
    )
    router: str = field(default="top_k", metadata={"help": f"Gate strategy, one of {sorted(ROUTERS)}."})
    router_jitter: float = field(
        default=0.0,
        metadata={"help": "Training-only multiplicative noise U(1-eps, 1+eps) on the router input (Switch); 0 = off."},
    )
    top_k_order: str = field(
        default="softmax_then_topk",
        metadata={
            "help": f"How top_k weights its chosen experts, one of {sorted(TOP_K_ORDERS)}: renormalised softmax "
            "(GShard/Mixtral), softmax over the k kept logits (Shazeer 2017; equal in value), or raw probabilities."
        },
    )
    router_noise: bool = field(
        default=False,
        metadata={
            "help": "Noisy top-k (Shazeer 2017): logits + N(0,1) * softplus(W_noise x), trainable, training only."
        },
    )
    capacity_factor: float | None = field(
        default=None,
        metadata={
            "help": "Expert capacity ceil(f * T * k / N) over the batch's non-padding tokens (top_k, switch); "
            "expert_choice picks ceil(f * T / N) tokens per expert. None: no capacity (top_k), 1.25 (switch), "
            "top_k (expert_choice)."
        },
    )
    capacity_policy: str = field(
        default="sequence",
        metadata={
            "help": f"Which assignments overflow capacity, one of {sorted(CAPACITY_POLICIES)}: earlier tokens "
            "first, highest top-1 probability first (BPR), or GShard's random second expert then token order."
        },
    )
    allow_noncausal_routing: bool = field(
        default=False,
        metadata={
            "help": "Let expert_choice run outside training in a causal model (it looks at later tokens, so "
            "generation and eval scoring leak the future); refused by default."
        },
    )
    sinkhorn_iterations: int = field(
        default=8, metadata={"help": "Sinkhorn iterations of the 'balanced' gate (S-BASE) in training."}
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
    # Routing level, more losses, schedule (checked in mope.routing.options); the options of the gates
    # top_p, hierarchical, dselect_k, cosine, hash, soft_merge, soft_tokens (checked by each gate's
    # Router.check_options; docs/gates/).
    router_temperature: float = field(
        default=1.0, metadata={"help": "Router softmax temperature T > 0: every gate sees logits / T."}
    )
    routing_level: str = field(
        default="token",
        metadata={
            "help": f"What the gate looks at, one of {sorted(ROUTING_LEVELS)}: each token; the masked mean of the "
            "layer input over the sequence (one decision per sequence); or task ids given as "
            "model(..., mope_task_ids=LongTensor[batch]) (a learned per-task gate, MOELoRA)."
        },
    )
    num_tasks: int | None = field(
        default=None, metadata={"help": "routing_level='task': number of tasks; task ids lie in [0, num_tasks)."}
    )
    top_p: float = field(
        default=0.4,
        metadata={
            "help": "router='top_p': each token uses the fewest experts whose probabilities sum to >= top_p "
            "(at most top_k), renormalised (Huang et al. 2024). In (0, 1]."
        },
    )
    num_groups: int = field(
        default=2,
        metadata={
            "help": "Experts split evenly into this many contiguous groups: the groups of router='hierarchical' "
            "and of LoRAMoE's localized balancing loss."
        },
    )
    dselect_gamma: float = field(
        default=1.0, metadata={"help": "router='dselect_k': width gamma > 0 of the smooth-step function."}
    )
    cosine_dim: int = field(
        default=16, metadata={"help": "router='cosine' (X-MoE): dimension of the low-dimensional routing space."}
    )
    cosine_init_temperature: float = field(
        default=0.07,
        metadata={"help": "router='cosine': initial value of the learned temperature (>= 0.01, where it is clamped)."},
    )
    hash_seed: int = field(default=0, metadata={"help": "router='hash': seed of the fixed random token-id hash."})
    soft_merge_lora: str = field(
        default="factors",
        metadata={
            "help": "router='soft_merge' with LoRA experts: 'factors' merges A and B separately (SMEAR's parameter "
            "merge; not the mixture of outputs) or 'delta' merges B_e^T A_e (the exact mixture of the experts' "
            "linear maps; one [d_out, d_in] weight per sequence in memory)."
        },
    )
    slots_per_expert: int = field(
        default=1,
        metadata={"help": "router='soft_tokens' (Soft MoE): slots each expert processes per sequence (>= 1)."},
    )
    importance_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of Shazeer's importance loss CV(sum of gate weights per expert)^2; 0 = off."},
    )
    entropy_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the mean per-token gate entropy; > 0 sharpens gates (DSelect-k, dynamic top-p), "
            "< 0 spreads them; 0 = off."
        },
    )
    localized_balance_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of LoRAMoE's localized balancing loss (needs model(..., group_ids=...)); 0 = off."},
    )
    localized_balance_delta: float = field(
        default=0.1,
        metadata={"help": "LoRAMoE's delta in [0, 1): importance of an example's own expert group counts 1 + delta."},
    )
    router_schedule_steps: int = field(
        default=0,
        metadata={"help": "Dense-to-sparse schedule length in steps (mope.routing.schedule); 0 = no schedule."},
    )
    router_schedule_start_top_k: int | None = field(
        default=None,
        metadata={"help": "top_k at step 0, moved linearly to top_k over the schedule; None = top_k not annealed."},
    )
    router_schedule_start_temperature: float | None = field(
        default=None,
        metadata={"help": "Router temperature at step 0, moved linearly to router_temperature; None = not annealed."},
    )
    router_schedule_counter: str = field(
        default="forward",
        metadata={
            "help": "What advances the schedule: 'forward' (each training forward; gradient accumulation counts "
            "micro-batches) or 'manual' (mope.step_schedule(model) after each optimizer step)."
        },
    )
    dispatch: str = field(
        default="auto",
        metadata={
            "help": f"How LoRA experts are applied, one of {list(DISPATCH_CHOICES)} (mope.dispatch): 'auto' picks "
            "by shape. A runtime setting: not saved in adapter_config.json; mope.set_dispatch changes it later."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: expert B matrices start at zero, so the wrapped model equals the base model. "
            "False: random, non-identity init (for tests)."
        },
    )
    freeze_experts: bool = field(
        default=False,
        metadata={
            "help": "True: the experts never train (requires_grad stays False through set_adapter and "
            "is_trainable=True loads); only the routers do. mope.from_lora_adapters(trainable=False) sets it. "
            "A new adapter with init_weights=True is refused (its experts would stay the identity)."
        },
    )
    base_model_type: str | None = field(
        default=None,
        metadata={"help": "model_type of the base model the adapter was made for; filled in automatically."},
    )
    mope_version: str = field(default=MOPE_VERSION, metadata={"help": "mope version that wrote this config."})
    upgraded_from: str | None = field(
        default=None,
        metadata={
            "help": "Set on load when adapter_config.json was upgraded (mope.bundles.upgrade): the mope version that "
            "wrote it ('unversioned' if none). None: loaded as written. Runtime-only, not saved."
        },
    )

    bundle: BundleHeader | None = field(
        default=None,
        metadata={
            "help": "Set by from_pretrained: the bundle folder this config was read from and its tensor header, "
            "checked against the model after injection. Runtime-only, not saved."
        },
    )

    def __post_init__(self) -> None:
        self._check_types()  # first: PEFT's own check would fail on a wrong type
        super().__post_init__()
        self.peft_type = add_peft_type_member()
        self.validate()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), (list, tuple, frozenset)):  # a frozenset: PEFT's save writes sets only
                setattr(self, name, set(getattr(self, name)))

    def validate(self) -> None:
        """Every check of the constructor, again: ``get_peft_model`` and ``add_adapter`` call it, so a field assigned
        after construction (PEFT's ``config.r = 16`` idiom) is a ValueError naming it before the model is touched
        (``router_temperature=0`` gave a NaN loss, ``router='topk'`` a bare KeyError)."""
        self._check_types()
        if self.task_type is not None and self.task_type not in list(TaskType):  # PEFT checks it at construction only
            raise ValueError(
                f"MoPEConfig.task_type={self.task_type!r} is not one of PEFT's task types: {', '.join(TaskType)}"
            )
        self._check()
        check_shared_options(self, ROUTERS)
        for gate in ROUTERS.values():  # every gate, whichever is chosen: a bad saved value is refused now
            gate.check_options(self)
        ROUTERS[self.router].check_chosen(self)

    def _check_types(self) -> None:
        for name, hint in typed_fields(type(self)):
            check_type("MoPEConfig", name, getattr(self, name), hint)

    # Runtime-only settings: kept out of the saved adapter_config.json (as LoraConfig.runtime_config).
    RUNTIME_FIELDS = ("dispatch", "upgraded_from", "bundle")

    def to_dict(self) -> dict[str, Any]:
        """The saved configuration: every field but the runtime-only ones."""
        saved = super().to_dict()
        for name in self.RUNTIME_FIELDS:
            saved.pop(name, None)
        for name, value in saved.items():  # assigned after construction: PEFT's save turns sets into lists, no other
            if isinstance(value, frozenset):
                saved[name] = set(value)
        saved["mope_version"] = MOPE_VERSION  # this mope writes it (an older value read as an upgrade on load)
        return saved

    def _check(self) -> None:
        """The experts, their targets and the runtime settings; the routing options are checked after."""
        for name in ("num_experts", "top_k", "r"):
            check_int("MoPEConfig", name, getattr(self, name), low=1)
        check_int(
            "MoPEConfig",
            "num_shared_experts",
            self.num_shared_experts,
            low=0,
            high=self.num_experts - 1,
            why="(at least one expert must be routed)",
        )
        self.check_top_k(self.num_experts, self.top_k, "MoPEConfig.top_k")
        for name in ("num_experts_pattern", "top_k_pattern"):
            for pattern, value in getattr(self, name).items():
                check_int("MoPEConfig", f"{name}[{pattern!r}]", value, low=1)
                check_regex(f"{name} key", pattern)
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):  # a str is a regex (PEFT's rule)
            if isinstance(getattr(self, name), str) and getattr(self, name) != "all-linear":
                check_regex(name, getattr(self, name))
        for pattern in self.router_blocks or ():
            check_regex("router_blocks entry", pattern)
        check_choice("MoPEConfig", "adapter_placement", self.adapter_placement, ADAPTER_PLACEMENTS)
        check_choice("MoPEConfig", "adapter_activation", self.adapter_activation, ACTIVATIONS)
        check_number("MoPEConfig", "adapter_scaling", self.adapter_scaling, low=0, low_open=True)
        if self.feedforward_modules and self.expert_type != "ia3":
            raise ValueError("MoPEConfig.feedforward_modules only applies to expert_type='ia3'")
        check_number("MoPEConfig", "lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_number("MoPEConfig", "lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        check_choice("MoPEConfig", "router", self.router, ROUTERS)
        check_choice("MoPEConfig", "expert_type", self.expert_type, EXPERT_BANKS)
        check_choice("MoPEConfig", "dispatch", self.dispatch, DISPATCH_CHOICES)
        check_bool("MoPEConfig", "init_weights", self.init_weights)
        check_bool("MoPEConfig", "freeze_experts", self.freeze_experts)
        check_bool("MoPEConfig", "inference_mode", self.inference_mode)
        check_version("MoPEConfig", "mope_version", self.mope_version)
        if Version(self.mope_version) > Version(MOPE_VERSION):  # PEFT's PeftConfig.from_pretrained comes here directly
            raise ValueError(
                f"MoPEConfig.mope_version={self.mope_version!r}: this config {newer_than_this(self.mope_version)}"
            )
        if self.target_parameters:
            raise ValueError("MoPEConfig.target_parameters is not supported: mope adapts modules, not parameters")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("MoPEConfig.layers_pattern needs MoPEConfig.layers_to_transform to be set")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "MoPEConfig.layers_to_transform cannot be combined with a str target_modules (a regex or 'all-linear'): "
                "give target_modules as a list of names"
            )

    def check_top_k(self, num_experts: int, top_k: int, where: str) -> None:
        routed = num_experts - self.num_shared_experts
        if routed < 1:
            raise ValueError(
                f"{where}: num_experts={num_experts} leaves no routed expert beside "
                f"num_shared_experts={self.num_shared_experts}"
            )
        if top_k > routed:
            raise ValueError(
                f"{where} ({top_k}) must not exceed the routed experts (num_experts - num_shared_experts = {routed})"
            )

    def module_settings(self, module_name: str) -> tuple[int, int]:
        """``(num_experts, top_k)`` for one module, after ``num_experts_pattern`` / ``top_k_pattern``."""
        num_experts = pattern_value(self.num_experts_pattern, module_name, self.num_experts, "num_experts_pattern")
        top_k = pattern_value(self.top_k_pattern, module_name, self.top_k, "top_k_pattern")
        self.check_top_k(num_experts, top_k, f"MoPEConfig.top_k/top_k_pattern for module '{module_name}'")
        return num_experts, top_k

    def is_feedforward(self, module_name: str) -> bool:
        """Whether ``feedforward_modules`` lists the module ((IA)3 then scales its input)."""
        return lists_module(self.feedforward_modules, module_name)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """The config stored in ``path_json_file``, upgraded to this mope version (``mope.bundles.upgrade``).

        ``from_pretrained`` reads the file through here, so an old bundle is upgraded explicitly
        (logged, ``upgraded_from`` set) and a newer, malformed or unknown-key one is a clear ValueError.
        A file whose ``peft_type`` is not ``"MOPE"`` is refused first: PEFT would build another method's
        config from it (a LoraConfig, keeping the keys it knows) or fail on a missing key.
        """
        check_peft_type(read_json_object(path_json_file), path_json_file)
        return read_config_file(path_json_file, cls)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> MoPEConfig:
        """Load ``adapter_config.json`` and remember the bundle's folder.

        PEFT loads the config before it touches the model, so this is where a local bundle's
        tensor file is opened (header only) and checked; the model-dependent checks run after
        injection, and a failure there restores the model (see ``MoPEModel.inject_adapter``).
        A field's error names the file it came from.
        """
        # normpath: joining "" leaves a trailing separator, and error messages must name the real file path.
        folder = os.path.normpath(os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or ""))
        source = (
            os.path.join(folder, CONFIG_NAME) if os.path.isdir(folder) else os.fspath(pretrained_model_name_or_path)
        )
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as error:
            if source in str(error):
                raise
            raise ValueError(f"{error} (read from '{source}')") from error
        if os.path.isdir(folder):
            config.bundle = BundleHeader.read(folder)
        return config


def check_peft_type(loaded: dict[str, Any], path: str) -> None:
    """A MoPE bundle's config says ``"peft_type": "MOPE"``; name the file and what it says instead."""
    peft_type = loaded.get("peft_type")
    if peft_type == PEFT_TYPE:
        return
    if peft_type is None:
        problem = "has no 'peft_type' key (PEFT cannot load a bundle without it)"
        fix = f'add "peft_type": "{PEFT_TYPE}", or save the adapter again with mope.save_pretrained'
    else:
        problem = f"has peft_type={peft_type!r}: it is not a MoPE bundle"
        fix = "load it with peft.PeftModel.from_pretrained" + (
            " (LoRA bundles can also join a mixture: mope.from_lora_adapters)" if peft_type == "LORA" else ""
        )
    raise ValueError(f"'{path}' {problem}; a MoPE bundle's config says peft_type='{PEFT_TYPE}'. Fix: {fix}.")
