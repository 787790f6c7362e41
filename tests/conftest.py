"""Shared fixtures and helpers: tiny random models built from configs (no downloads), and what several test files use.

Test files in every folder import these as ``from conftest import ...`` (pytest's default "prepend" import
mode puts tests/ on sys.path when it loads this file); test file names are unique across folders for the
same reason (see tests/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

import mope  # registers the MOPE PEFT type

transformers.logging.set_verbosity_error()
# One thread per test process: pytest-xdist runs one process per core, and tiny models gain
# nothing from intra-op threads (two processes with default threads each ran 10x slower).
torch.set_num_threads(1)


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (its own imports find the others there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert(num_labels: int = 3):
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_mixtral():
    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )
    return transformers.MixtralForCausalLM(config)


def tiny_t5():
    config = transformers.T5Config(
        vocab_size=128,
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


# name -> (factory, task_type); the seed makes each call return the same weights.
MODELS = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
}


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    model.eval()
    return model


def make_batch(name: str, batch: int = 2, seq: int = 8, seed: int = 1, pad: int = 0) -> dict:
    """A batch with labels for the model family; ``pad`` left-pads the first row's mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "bert":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif name == "t5":
        out["labels"] = torch.randint(1, 128, (batch, seq // 2), generator=g)
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def assert_round_trip(model, model_name: str, folder) -> None:
    """Save ``model``, load the bundle onto a fresh base with PEFT, and expect identical logits."""
    from peft import PeftModel

    model.eval()
    batch = make_batch(model_name, pad=2)
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(make_model(model_name), folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)


@pytest.fixture
def model_factory():
    return make_model


# --- "the model is unchanged": everything a refused call could have changed -------------------------


def no_grad_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.clone()


@dataclass
class Snapshot:
    """Everything a failed call could have changed on a model, captured by value."""

    modules: list[tuple[str, type]]
    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: list[tuple[str, bool]]
    hooks: list[tuple[str, int, int]]
    config: dict[str, Any] | None
    has_peft_config: bool
    peft_config_keys: list[str] | None
    logits: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, batch: dict) -> Snapshot:
        config = getattr(model, "config", None)
        peft_config = getattr(model, "peft_config", None)
        return cls(
            modules=[(name, type(module)) for name, module in model.named_modules()],
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
            training=[(name, module.training) for name, module in model.named_modules()],
            hooks=[(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
            config=config.to_dict() if config is not None and hasattr(config, "to_dict") else None,
            has_peft_config="peft_config" in vars(model),
            peft_config_keys=sorted(peft_config) if isinstance(peft_config, dict) else None,
            logits=no_grad_logits(model, batch),
        )

    def assert_same(self, model: nn.Module, batch: dict) -> None:
        after = Snapshot.of(model, batch)
        assert after.modules == self.modules, "module names or types changed"
        assert after.state.keys() == self.state.keys(), "state_dict keys changed"
        for key, value in self.state.items():
            assert torch.equal(after.state[key], value), f"tensor {key} changed"
        assert after.requires_grad == self.requires_grad, "requires_grad flags changed"
        assert after.training == self.training, "train/eval modes changed"
        assert after.hooks == self.hooks, "forward hooks were added or removed"
        assert after.config == self.config, "model.config changed"
        assert after.has_peft_config == self.has_peft_config, "peft_config attribute added or removed"
        assert after.peft_config_keys == self.peft_config_keys, "adapters in peft_config changed"
        torch.testing.assert_close(after.logits, self.logits, rtol=0, atol=0)


def assert_plain(model: nn.Module) -> None:
    """No trace of MoPE left on a base model."""
    assert not any(isinstance(m, mope.MoPELayer) for m in model.modules())
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())
    assert "peft_config" not in vars(model)


# --- gates on their own, outside a model ------------------------------------------------------------


def make_router(router: str = "top_k", n: int = 4, k: int = 2, in_features: int = 8, **kwargs):
    """A gate as the registry builds it, with the router's own initial weight."""
    config = mope.MoPEConfig(num_experts=n, top_k=k, router=router, **kwargs)
    return mope.ROUTERS[router](in_features, n, k, config)


def router_of(router: str, num_experts: int = 6, top_k: int = 2, **options):
    """A gate of 16 features whose scoring weight (if any) is drawn N(0, 1): sharp, varied choices."""
    config = mope.MoPEConfig(**{"num_experts": num_experts, "top_k": top_k, "router": router, **options})
    torch.manual_seed(0)
    gate = mope.ROUTERS[router](16, num_experts, top_k, config)
    if hasattr(gate, "weight"):
        with torch.no_grad():
            gate.weight.normal_(0, 1.0)
    return gate


def skewed_logits(batch: int, seq: int, n: int, seed: int) -> torch.Tensor:
    """Random logits leaning towards expert 0, so that capacity overflows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, n, generator=g)
    logits[..., 0] += 1.0
    return logits


def padded_mask(batch: int, seq: int) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[-1, -2:] = 0  # right padding
    return mask


# --- generation ----------------------------------------------------------------------------------------


def prompts(padded: bool) -> dict[str, torch.Tensor]:
    """Two prompts; ``padded``: the second is shorter and left-padded, as a tokenizer with padding_side='left' does."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :3] = 0
        mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model, batch: dict, use_cache: bool) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def assert_cache_agrees(model, batch: dict) -> None:
    cached, uncached = greedy(model, batch, True), greedy(model, batch, False)
    start = 1 if model.config.is_encoder_decoder else batch["input_ids"].shape[1]  # decoder start token or prompt
    assert cached.shape == (2, start + 6)
    assert torch.equal(cached, uncached), f"cached {cached.tolist()}\nuncached {uncached.tolist()}"


# --- LoRA adapters that PEFT trained and saved (mope.from_lora_adapters, the Arrow gate) -------------

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def train_lora(model_name: str, folder: Path, seed: int, **lora_kwargs) -> Path:
    """A few AdamW steps of a PEFT LoRA on random tokens (seeded, so adapters differ), saved by PEFT."""
    model = get_peft_model(make_model(model_name), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        batch = make_batch(model_name, batch=2, seq=8, seed=100 * seed + step)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_adapters(tmp_path_factory) -> list[Path]:
    """Three Llama LoRAs: r=2; r=4 with rank and alpha patterns; r=4 with rsLoRA scaling."""
    root = tmp_path_factory.mktemp("loras")
    return [
        train_lora("llama", root / "r2", seed=1, r=2, lora_alpha=4, target_modules=LLAMA_TARGETS),
        train_lora(
            "llama",
            root / "r4",
            seed=2,
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"down_proj": 3},
            alpha_pattern={"v_proj": 2},
        ),
        train_lora("llama", root / "rs", seed=3, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True),
    ]


# --- routing analyses (mope.analysis) -----------------------------------------------------------------


def routed_llama(targets=("q_proj", "up_proj"), seed: int = 0, **kwargs):
    """Tiny Llama with MoPE on ``targets`` (r=2), its adapter initialised under ``seed``, in eval mode."""
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=list(targets), r=2, **kwargs)
    torch.manual_seed(seed)
    return get_peft_model(make_model("llama"), config).eval()


def repeated_token_batches(count: int = 3, seq: int = 16) -> list[dict]:
    """Few distinct ids (1..6) in random contexts, so every id recurs in many contexts."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 7, (4, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# --- the soft gates' model battery (tests/routing/test_soft_merge.py, test_soft_tokens.py) ---------

SOFT_TRAINED = {"lora": "lora_B", "lora_shared_a": "lora_B", "adapter": "up", "ia3": "ia3_l"}


def soft_gate_config(model_name: str, router: str, num_experts: int = 4, **kwargs):
    import mope

    task = "SEQ_CLS" if model_name == "bert" else "CAUSAL_LM"
    # BERT's pooler sees one vector per example: soft_tokens adapts the encoder's tokens only.
    targets = r".*encoder.*(query|key|value|dense)$" if router == "soft_tokens" else "all-linear"
    return mope.MoPEConfig(
        task_type=task, target_modules=targets, num_experts=num_experts, r=4, router=router, init_weights=False,
        **kwargs,
    )  # fmt: skip


def check_soft_gate_trains_and_round_trips(model_name: str, router: str, kwargs: dict, folder) -> None:
    """A training step reaches the routers and the experts; the bundle reloads with identical logits."""
    from peft import get_peft_model

    model = get_peft_model(make_model(model_name), soft_gate_config(model_name, router, **kwargs))
    model.train()
    out = model(**make_batch(model_name, pad=2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    named = dict(model.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if "mope_router" in n)
    trained = SOFT_TRAINED[kwargs["expert_type"]]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if n.endswith(trained))
    assert_round_trip(model, model_name, folder)


def check_soft_gate_ignores_padding(model_name: str, router: str, kwargs: dict) -> None:
    """Padding appended to every sequence changes nothing for the real tokens."""
    from peft import get_peft_model

    model = get_peft_model(make_model(model_name), soft_gate_config(model_name, router, **kwargs)).eval()
    batch = make_batch(model_name)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded_ids = torch.cat([ids, torch.randint(1, 128, (2, 3))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=padded_ids, attention_mask=padded_mask).logits
    if model_name == "llama":
        got = got[:, : ids.shape[1]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def bundle_config(**overrides):
    """A MoPE config with random (non-identity) experts on every linear of a tiny causal LM."""
    import mope

    kwargs = {"task_type": "CAUSAL_LM", "target_modules": "all-linear", "num_experts": 4, "top_k": 2, "r": 4}
    return mope.MoPEConfig(**{**kwargs, "init_weights": False, **overrides})


# --- small exportable mixtures (tests/test_export.py, tests/routing/test_fixed_task.py) -------------

TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def mope_model(name: str, **kwargs):
    """A MoPE model of the family (one LoRA expert on every linear unless kwargs say otherwise), in eval."""
    from peft import get_peft_model

    import mope

    defaults = {"target_modules": "all-linear", "num_experts": 1, "top_k": 1, "r": 2, "lora_alpha": 4}
    config = mope.MoPEConfig(task_type=TASK_TYPES[name], init_weights=False, **{**defaults, **kwargs})
    torch.manual_seed(3)
    return get_peft_model(make_model(name), config).eval()


def three_row_logits(model, name: str, **extra) -> torch.Tensor:
    """Logits of a 3-example batch with a left-padded first row."""
    with torch.no_grad():
        return model(**make_batch(name, batch=3, pad=2), **extra).logits


# Appended to each script of ranks_of_two_cpu_processes. Rank 0 aborted in CI twice after everything was written
# ("terminate called without an active exception"), the second time with the group destroyed: most likely in the
# interpreter's teardown, where the trainers' DDP wrappers still hold gloo's group. That teardown is skipped.
EXIT_WITHOUT_TEARDOWN = """
torch.distributed.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


# accelerate 1.16 runs CPU processes as DDP even under ``--use_fsdp`` / ``--use_deepspeed`` (``AcceleratorState``
# keeps ``MULTI_CPU``). A launched script that starts with this lifts that one guard, so that mope's code runs under
# real sharding, as across GPUs: FSDP2 DTensor parameters, ZeRO-3 partitioned ones.
SHARDED_ON_CPU = """
import os
from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
init = state.AcceleratorState.__init__
def sharded_on_cpu(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.distributed_type = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        kwargs["deepspeed_plugin"].set_mixed_precision("no")
        kwargs["deepspeed_plugin"].select(_from_accelerator_state=True)
        self.deepspeed_plugins = kwargs["deepspeed_plugin"]
        self.distributed_type = DistributedType.DEEPSPEED
    state.PartialState._shared_state["distributed_type"] = self.distributed_type
state.AcceleratorState.__init__ = sharded_on_cpu
"""
# accelerate launch's flags
ZERO3 = ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true"]


def fsdp2(layer: str) -> list[str]:
    """accelerate launch's flags for FSDP2 wrapping each ``layer`` (a decoder layer class name)."""
    return ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", layer]  # fmt: skip


def ranks_of_two_cpu_processes(script: str, folder: Path, *args: str, flags: Sequence[str] = ("--multi_gpu",)) -> list:
    """Run ``script`` (text, importing os, sys and torch) under ``accelerate launch FLAGS`` on two CPU processes
    (gloo) with ``folder`` and ``args`` as its arguments; it writes ``folder/rank{RANK}.json``. Returns the two
    ranks' JSON values."""
    path = folder / "script.py"
    path.write_text(script + EXIT_WITHOUT_TEARDOWN)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", *flags, "--num_processes", "2", str(path), str(folder), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(command, check=True, env=env, timeout=300)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def compiled_steps_without_recompiles(dispatch: str, device: str = "cpu") -> None:
    """Compiled training steps of a tiny Llama (top-2 of 8, aux losses on), each on a new batch's tensors, with an
    eager evaluation and an eager step between: no compiled frame may recompile (each would, until Dynamo gives
    up at its cache limit and runs the frame eagerly). The aux-loss hook once grouped layers by ``id(mask)``,
    a guard on each batch's mask, and the fused layer's kept check (``MoPELayer.fused_check``) set by eager calls
    was a guard too."""
    import torch._dynamo

    config = mope.MoPEConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], num_experts=8, top_k=2, r=4, init_weights=False,
        z_loss_coef=0.01, dispatch=dispatch,
    )  # fmt: skip
    model = get_peft_model(make_model("llama"), config).to(device).train()
    inner = model.base_model.model
    compiled = torch.compile(inner, backend="eager")

    def step(call) -> None:
        batch = {k: v.to(device) for k, v in make_batch("llama", pad=2).items()}  # new tensors each time
        call(**batch).loss.backward()

    step(compiled)
    step(compiled)  # the first recompile, if any, would come with a new batch
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            with torch.no_grad():
                inner.eval()
                inner(**{k: v.to(device) for k, v in make_batch("llama", pad=2).items()})
                inner.train()
            step(inner)
            step(compiled)


def word_tokenizer(vocab_size: int = 128):
    """A tokenizer for the tiny models: the word ``t<i>`` is token i (``t0`` pads, ``t1`` ends), built in memory."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # whole words only: a special token matched inside words split t10 into t1 t0
    fast = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        pad_token=AddedToken("t0", single_word=True),
        eos_token=AddedToken("t1", single_word=True),
    )
    fast.chat_template = "{% for m in messages %}t2 {{ m['content'] }} {% endfor %}"
    return fast
