"""Models whose inputs are not text: audio (Wav2Vec2) and a text + vision model (CLIP). Their bundles load, and a
mask that covers other positions than a layer's tokens is not applied to them."""

from __future__ import annotations

import torch
import transformers
from conftest import no_grad_logits
from peft import PeftModel, get_peft_model

import mope
from mope.routing.context import RoutingContext


def tiny_wav2vec2() -> transformers.Wav2Vec2ForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_labels=3, feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=32, mask_time_prob=0.0,
    )  # fmt: skip
    return transformers.Wav2Vec2ForSequenceClassification(config).eval()


def test_a_bundle_loads_on_a_model_without_input_embeddings(tmp_path):
    # the bundle check asked PEFT for the embedding layers, and Wav2Vec2 raises NotImplementedError there
    config = mope.MoPEConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1)
    model = get_peft_model(tiny_wav2vec2(), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mope_" in name:
                param.normal_(0, 0.5)
    mope.save_pretrained(model, tmp_path / "bundle")
    batch = {"input_values": torch.randn(2, 400), "attention_mask": torch.ones(2, 400, dtype=torch.long)}
    for load in (mope.load_mope, PeftModel.from_pretrained):
        loaded = load(tiny_wav2vec2(), tmp_path / "bundle").eval()
        torch.testing.assert_close(no_grad_logits(loaded, batch), no_grad_logits(model, batch), rtol=0, atol=0)


def test_a_mask_over_other_positions_is_not_cut_to_a_layers_tokens():
    # a 400-sample mask met 18 frames (rows padded by 18 samples counted as all padding); CLIP's 17 image patches
    # got the last 17 columns of the text's mask. Its last columns are a layer's tokens only in a cached step
    # (or for one token: an lm_head under logits_to_keep=1).
    context = RoutingContext()
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 12:] = 0
    context.begin({"attention_mask": mask, "input_ids": torch.arange(40).view(2, 20)}, collecting=False)
    assert context.token_mask("attention_mask", torch.Size([2, 17])) is None
    assert context.aligned("input_ids", torch.Size([2, 17])) is None
    assert torch.equal(context.token_mask("attention_mask", torch.Size([2, 20])), mask)
    assert torch.equal(context.token_mask("attention_mask", torch.Size([2, 1])), mask[:, -1:])
    context.begin({"attention_mask": mask}, collecting=False, continues_cache=True)
    assert torch.equal(context.token_mask("attention_mask", torch.Size([2, 3])), mask[:, -3:])


def test_clip_image_embeddings_do_not_depend_on_the_texts_padding():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 99, "max_position_embeddings": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 4},
        projection_dim=16,
    )  # fmt: skip
    mope_config = mope.MoPEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, routing_level="sequence")
    model = get_peft_model(transformers.CLIPModel(config), mope_config).eval()  # 17 image tokens, 20 text tokens
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mope_" in name:
                param.normal_(0, 1.0)
    images = torch.randn(2, 3, 16, 16)
    ids = torch.randint(1, 99, (2, 20))
    full, padded = torch.ones(2, 20, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)
    padded[1, 8:] = 0
    with torch.no_grad():
        embeds = [model(input_ids=ids, attention_mask=m, pixel_values=images).image_embeds for m in (full, padded)]
    torch.testing.assert_close(embeds[1], embeds[0], rtol=0, atol=0)


def test_generate_leaves_no_cached_call_behind():
    # Whisper's generate calls its encoder directly: after mope's generate it read the last step's call (a continued
    # KV cache), and a plain generate then raised
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    model = get_peft_model(
        transformers.LlamaForCausalLM(config), mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    )
    model.generate(input_ids=torch.randint(1, 64, (1, 5)), max_new_tokens=3, do_sample=False)
    assert not model.base_model.routing_context.call.continues_cache


def test_an_audio_example_routes_the_same_alone_and_padded_in_a_batch():
    # the layers see frames, the mask covers samples: its last columns were taken for the frames, so a row padded by
    # 18 samples or more counted as all padding (a sequence-level decision 0.08 off); the model says which frames
    # are real
    config = mope.MoPEConfig(
        task_type="SEQ_CLS", target_modules=["q_proj", "v_proj", "intermediate_dense"], num_experts=4, top_k=2,
        routing_level="sequence", init_weights=False,
    )  # fmt: skip
    model = get_peft_model(tiny_wav2vec2(), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mope_" in name:
                param.normal_(0, 0.5)
    torch.manual_seed(1)
    long, short = torch.randn(1, 400), torch.randn(1, 240)
    batch = torch.zeros(2, 400)
    batch[0], batch[1, :240] = long[0], short[0]
    mask = torch.zeros(2, 400, dtype=torch.long)
    mask[0], mask[1, :240] = 1, 1
    padded = no_grad_logits(model, {"input_values": batch, "attention_mask": mask})
    alone = no_grad_logits(model, {"input_values": short, "attention_mask": torch.ones(1, 240, dtype=torch.long)})
    torch.testing.assert_close(padded[1:], alone, rtol=1e-5, atol=1e-5)
