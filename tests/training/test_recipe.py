"""Training recipes (mope.training.recipe): every YAML under recipes/ validates and says how to launch it; unknown
keys, wrong types and conflicting learning rates are named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model

from mope import MoPEConfig
from mope.training.loop import parameter_groups
from mope.training.models import adapter_config, bitsandbytes_config
from mope.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


OFFLINE_TINY = ROOT / "recipes" / "offline" / "tiny_llama_lm.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates_and_opens_with_launch_comment(path):
    recipe = load_recipe(path)
    assert recipe.training.output_dir
    if recipe.adapter.method == "mope":  # the adapter block must be a valid MoPEConfig too
        MoPEConfig(**recipe.adapter.config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} must open with a comment"
    assert "accelerate launch" in path.read_text().split("\n\n")[0] or "Launch" in path.read_text()


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    with pytest.raises(RecipeError, match=r"training\.learnin_rate"):
        load_recipe(OFFLINE_TINY, ["training.learnin_rate=0.1"])
    with pytest.raises(RecipeError, match=r"training\.batch_size"):
        load_recipe(OFFLINE_TINY, ["training.batch_size=many"])
    with pytest.raises(RecipeError, match="max_steps"):
        load_recipe(OFFLINE_TINY, ["training.epochs=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml"):
        load_recipe(bad)


def test_values_read_as_yaml_1_2_and_strictly(tmp_path):
    # PyYAML's YAML 1.1 read the documented `mixed_precision: no` as False (refused) and 1e-2 as a string
    text = OFFLINE_TINY.read_text().replace(
        "training:\n", "training:\n  mixed_precision: no\n  weight_decay: 1e-2\n", 1
    )
    (tmp_path / "recipe.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "recipe.yaml", ["adapter.config.aux_loss_coef=1e-2", "training.output_dir=on"])
    assert recipe.training.mixed_precision == "no" and recipe.training.weight_decay == 0.01
    assert recipe.adapter.config["aux_loss_coef"] == 0.01 and recipe.training.output_dir == "on"
    assert load_recipe(OFFLINE_TINY, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    # a YAML true is not the number 1 (max_steps=true trained one step); inf is no length
    with pytest.raises(RecipeError, match=r"training\.max_steps: Input should be a valid integer"):
        load_recipe(OFFLINE_TINY, ["training.max_steps=true"])
    with pytest.raises(RecipeError, match=r"training\.epochs: Input should be a finite number"):
        load_recipe(OFFLINE_TINY, ["training.max_steps=null", "training.epochs=.inf"])
    with pytest.raises(RecipeError, match=r"training\.gradient_checkpointing: Input should be a valid boolean"):
        load_recipe(OFFLINE_TINY, ["training.gradient_checkpointing=yes"])


def test_router_learning_rate_absolute_or_relative_and_not_both():
    lr = ["training.learning_rate=0.004"]
    assert load_recipe(OFFLINE_TINY, lr).training.router_lr == pytest.approx(0.004)  # default: same rate
    assert load_recipe(OFFLINE_TINY, [*lr, "training.router_lr_scale=0.25"]).training.router_lr == pytest.approx(0.001)
    assert load_recipe(OFFLINE_TINY, [*lr, "training.router_learning_rate=0.0003"]).training.router_lr == 0.0003
    with pytest.raises(RecipeError, match=r"router_learning_rate.*router_lr_scale"):
        load_recipe(OFFLINE_TINY, ["training.router_learning_rate=0.001", "training.router_lr_scale=0.1"])
    with pytest.raises(RecipeError, match=r"training\.router_lr_scale"):
        load_recipe(OFFLINE_TINY, ["training.router_lr_scale=0"])
    model = get_peft_model(tiny_llama(), MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], num_experts=4))
    groups = parameter_groups(model, load_recipe(OFFLINE_TINY, [*lr, "training.router_lr_scale=0.5"]))
    assert [g["lr"] for g in groups] == [0.004, 0.002]
    assert all("mope_router" in n for n, p in model.named_parameters() if any(p is q for q in groups[1]["params"]))


def test_the_qlora_recipe_loads_llama3_in_4_bits_as_the_script_it_replaces_did():
    """recipes/hub/llama3_8b_qlora_mixlora.yaml replaced a Python script written while the schema had no
    quantization: the same BitsAndBytesConfig, MixLoRA config and non-reentrant gradient checkpointing."""
    recipe = load_recipe(ROOT / "recipes" / "hub" / "llama3_8b_qlora_mixlora.yaml")
    bnb = bitsandbytes_config(recipe.model.quantization, recipe.model.task)
    assert (bnb.load_in_4bit, bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16 and bnb.llm_int8_skip_modules is None  # lm_head: transformers'
    config = adapter_config(recipe.adapter, recipe.model.task)
    assert (config.num_experts, config.top_k, config.r, config.lora_alpha) == (8, 2, 8, 16)
    assert set(config.target_modules) == {"gate_proj", "up_proj", "down_proj"} and config.router_blocks == ["mlp"]
    assert recipe.training.gradient_checkpointing and recipe.training.mixed_precision == "bf16"


def test_what_a_run_cannot_count_or_evaluate_is_refused_before_it_starts():
    # a forward-counted schedule counted each process's micro-batches and the probe's steps: 2 processes reached
    # step 4 where one accumulating 2 reached 8; expert choice in a causal LM trained, then died at the evaluation
    schedule = ["adapter.config.router_schedule_steps=8", "adapter.config.router_schedule_start_top_k=4"]
    with pytest.raises(RecipeError, match=r"router_schedule_counter: a run steps the router schedule once per"):
        load_recipe(OFFLINE_TINY, schedule)
    assert load_recipe(OFFLINE_TINY, [*schedule, "adapter.config.router_schedule_counter=manual"])
    choice = ["adapter.config.router=expert_choice"]
    with pytest.raises(RecipeError, match=r"router='expert_choice' .* set adapter\.config\.allow_noncausal_routing"):
        load_recipe(OFFLINE_TINY, choice)
    assert load_recipe(OFFLINE_TINY, [*choice, "adapter.config.allow_noncausal_routing=true"])
