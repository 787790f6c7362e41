"""Shared fixtures: tiny random models built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers

import mope  # noqa: F401  (registers the MOPE PEFT type)

transformers.logging.set_verbosity_error()
# One thread per test process: pytest-xdist runs one process per core, and tiny models gain
# nothing from intra-op threads (two processes with default threads each ran 10x slower).
torch.set_num_threads(1)


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
