"""``python -m mope.train``: a failed run prints one ``error:`` line and exits with its own code (2 a recipe, 3 a divergence)."""

from __future__ import annotations

import re
from pathlib import Path

from accelerate.state import AcceleratorState

from mope.train import main

TINY = Path(__file__).resolve().parents[2] / "recipes" / "offline" / "tiny_llama_lm.yaml"


def test_a_diverged_run_exits_3_with_one_error_line(tmp_path, capsys):
    AcceleratorState._reset_state()
    overrides = [f"training.output_dir={tmp_path}", "training.max_steps=6", "training.save_every=null"]
    overrides += ["data.max_examples=32", "training.learning_rate=1e6", "training.max_grad_norm=null"]
    assert main(["--recipe", str(TINY), *overrides]) == 3
    errors = re.findall(r"error: [^\r\n]*", capsys.readouterr().err)  # after tqdm's unfinished bar line
    assert len(errors) == 1 and errors[0].startswith("error: Training diverged:") and "NaN or inf" in errors[0]
    assert not (tmp_path / "bundle").exists()  # nothing saved


def test_an_adapter_config_the_model_refuses_exits_2_with_one_error_line(tmp_path, capsys):
    """Targets only the model can refuse (not a Linear, none matched) pass the recipe check; the run names them."""
    AcceleratorState._reset_state()
    for target, words in (("[embed_tokens]", "is a Embedding"), ("[no_such_proj]", "not found in the base model")):
        overrides = [f"training.output_dir={tmp_path}", f"adapter.config.target_modules={target}"]
        assert main(["--recipe", str(TINY), *overrides]) == 2
        errors = re.findall(r"error: [^\r\n]*", capsys.readouterr().err)
        assert len(errors) == 1 and errors[0].startswith("error: adapter.config does not fit the LlamaForCausalLM")
        assert words in errors[0]
    assert not (tmp_path / "bundle").exists()
