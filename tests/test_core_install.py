"""The core install: with only torch, peft, transformers and safetensors, mope wraps, trains, saves and reloads.

``make test-oldest`` runs this file (with the other core test files) in a fresh environment that has
the core dependencies at their lowest supported versions and none of the extras.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import torch
from conftest import make_model

import mope

ROOT = Path(__file__).resolve().parents[1]

# The optional dependencies of mope's tools (extras train, cli, plots); the core must not import them.
EXTRAS = ("yaml", "pydantic", "datasets", "tqdm", "typer", "rich", "matplotlib", "accelerate")


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_wrap_train_save_and_reload(tmp_path):
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4)
    model = peft.get_peft_model(make_model("llama"), config)
    before = adapter_weights(model)
    assert before and all("mope_" in name for name in before)
    assert any("mope_experts" in name for name in before) and any("mope_router" in name for name in before)

    model.train()
    torch.manual_seed(1)
    input_ids = torch.randint(0, 128, (2, 12))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = adapter_weights(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("mope_experts" in name for name in changed), "no expert weight changed"
    assert any("mope_router" in name for name in changed), "no router weight changed"

    model.eval()
    with torch.no_grad():
        want = model(input_ids=input_ids).logits
    mope.save_pretrained(model, tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "adapter_config.json").read_text())["peft_type"] == "MOPE"

    loaded = mope.load_mope(make_model("llama"), tmp_path / "bundle")
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def imported_extras(code: str) -> list[str]:
    """The extras modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint(sorted(m for m in {EXTRAS!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_import_mope_pulls_in_no_extras():
    # torch, huggingface_hub and transformers themselves import some of these when they are installed
    # (tqdm, yaml, accelerate, rich, depending on the versions): those are not mope's doing.
    baseline = imported_extras(
        "import torch, safetensors.torch, peft, transformers\n"
        "from transformers import PreTrainedModel\n"
        "from transformers.pytorch_utils import Conv1D"
    )
    with_mope = imported_extras("import mope")
    assert sorted(set(with_mope) - set(baseline)) == [], f"import mope imports {with_mope}, the core deps {baseline}"


def test_a_tool_without_its_extra_names_the_install_line():
    # the CLI said "mope: import of typer halted" and the plots a bare matplotlib ImportError
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for missing, code in (
        ("typer", "from mope.cli import main; main()"),
        ("matplotlib", "import mope.analysis.plots"),
    ):
        script = f"import sys; sys.modules[{missing!r}] = None\n{code}"  # find_spec then says: not installed
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode != 0
        extra = "cli" if missing == "typer" else "plots"
        assert f"pip install 'mope[{extra}]'" in done.stderr, done.stderr[-2000:]
