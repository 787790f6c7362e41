"""``python -m mope.predict``: the demo's reload check, predicting a classification recipe's eval split."""

from __future__ import annotations

from pathlib import Path

from mope.predict import main

LM_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "offline" / "tiny_llama_lm.yaml"


def test_a_causal_lm_recipe_is_refused_in_one_line_before_anything_is_loaded(tmp_path, capsys):
    out = tmp_path / "predictions.json"
    # no bundle at all: the refusal must come before a model is loaded
    code = main(["--recipe", str(LM_RECIPE), "--bundle", str(tmp_path / "no_bundle"), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("error: mope.predict supports classification recipes only")
    assert "model.task sequence_classification" in error and f"{LM_RECIPE} has model.task causal_lm" in error
    assert not out.exists()
