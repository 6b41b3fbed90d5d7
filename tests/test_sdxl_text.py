"""SDXL text conditioning: which layers, the pooled vector, long captions, and that training and
generation encode a prompt the same way."""

from __future__ import annotations

import pytest
import torch

from library.families.sd import text as sd_text
from library.families.sdxl import text
from library.families.sdxl.generation import encode_prompts_sdxl, size_conditioning
from library.families.sdxl.loading import load_sdxl_models
from library.sampling.prompts import SamplePrompt

CAPTIONS = ["a photo of a red circle on a blue square", "sks"]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_ckpt):
    return load_sdxl_models(tiny_sdxl_ckpt)


@torch.no_grad()
def test_penultimate_layers_and_pooled_at_first_eos(sdxl):
    ids = text.tokenize(sdxl.tokenizer1, sdxl.tokenizer2, CAPTIONS, None)
    assert ids.shape == (2, 2, 1, 77)
    # The two tokenizers differ only in padding: EOS (49407) vs "!" (0).
    assert ids[1, 0, 0, -1] == 49407 and ids[1, 1, 0, -1] == 0
    assert torch.equal(ids[:, 0, 0, :3], ids[:, 1, 0, :3])
    cond = text.encode(sdxl.text_encoder1, sdxl.text_encoder2, ids, eos_token_id=49407)
    h1 = sdxl.text_encoder1(ids[:, 0, 0], output_hidden_states=True).hidden_states[-2]
    out2 = sdxl.text_encoder2(ids[:, 1, 0], output_hidden_states=True)
    torch.testing.assert_close(cond.hidden1, h1)
    torch.testing.assert_close(cond.hidden2, out2.hidden_states[-2])
    # transformers pools at the first EOS too when eos_token_id is the real one.
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
    assert cond.context.shape == (2, 77, 64)
    assert not torch.allclose(cond.hidden1, sdxl.text_encoder1(ids[:, 0, 0]).last_hidden_state)


@torch.no_grad()
def test_long_captions_use_chunks_and_pool_from_the_first(sdxl):
    long = " ".join(["red circle"] * 60)
    ids = text.tokenize(sdxl.tokenizer1, sdxl.tokenizer2, [long, "short"], 150)
    assert ids.shape == (2, 2, 2, 77)
    cond = text.encode(sdxl.text_encoder1, sdxl.text_encoder2, ids, eos_token_id=49407)
    assert cond.hidden1.shape == (2, 152, 32) and cond.hidden2.shape == (2, 152, 32)
    first_chunk_only = text.encode(sdxl.text_encoder1, sdxl.text_encoder2, ids[:, :, :1], eos_token_id=49407)
    torch.testing.assert_close(cond.pooled, first_chunk_only.pooled)


@torch.no_grad()
def test_generation_encodes_like_training(sdxl):
    ids = text.tokenize(sdxl.tokenizer1, sdxl.tokenizer2, CAPTIONS, None)
    trained = text.encode(sdxl.text_encoder1, sdxl.text_encoder2, ids, eos_token_id=49407)
    generated = encode_prompts_sdxl(sdxl.tokenizers, sdxl.text_encoders, CAPTIONS, max_embeddings_multiples=1)
    torch.testing.assert_close(generated.hidden_states, trained.context)
    torch.testing.assert_close(generated.unet_kwargs["added_cond_kwargs"]["text_embeds"], trained.pooled)
    weighted = encode_prompts_sdxl(sdxl.tokenizers, sdxl.text_encoders, ["a photo of a (red:1.5) circle"],
                                   max_embeddings_multiples=1)
    plain = encode_prompts_sdxl(sdxl.tokenizers, sdxl.text_encoders, ["a photo of a red circle"],
                                max_embeddings_multiples=1)
    assert not torch.allclose(weighted.hidden_states, plain.hidden_states)
    torch.testing.assert_close(weighted.unet_kwargs["added_cond_kwargs"]["text_embeds"],
                               plain.unet_kwargs["added_cond_kwargs"]["text_embeds"])


@torch.no_grad()
def test_weighted_captions_with_unit_weights_equal_plain_encoding(sdxl):
    ids = text.tokenize(sdxl.tokenizer1, sdxl.tokenizer2, CAPTIONS, 150)
    plain = text.encode(sdxl.text_encoder1, sdxl.text_encoder2, ids, eos_token_id=49407)
    ids1, weights = sd_text.tokenize_weighted(sdxl.tokenizer1, CAPTIONS, 150)
    ids2, _ = sd_text.tokenize_weighted(sdxl.tokenizer2, CAPTIONS, 150)
    assert torch.equal(ids1, ids[:, 0]) and torch.equal(ids2, ids[:, 1])
    weighted = text.encode_weighted(sdxl.text_encoder1, sdxl.text_encoder2, ids1, ids2, weights, 49407)
    torch.testing.assert_close(weighted.context, plain.context)


def test_size_conditioning_defaults_and_overrides():
    prompt = SamplePrompt("x", width=832, height=1216)
    assert size_conditioning(prompt, negative=False).tolist() == [[1216, 832, 0, 0, 1216, 832]]
    prompt = SamplePrompt("x", width=64, height=64, extras={"original_width": 2048, "original_height": 1024,
                                                           "original_width_negative": 512, "crop_top": 8})
    assert size_conditioning(prompt, negative=False).tolist() == [[1024, 2048, 8, 0, 64, 64]]
    assert size_conditioning(prompt, negative=True).tolist() == [[1024, 512, 8, 0, 64, 64]]
    batch_ids = text.size_ids(torch.tensor([[768, 1024]]), torch.tensor([[0, 32]]), torch.tensor([[512, 512]]))
    assert batch_ids.tolist() == [[768, 1024, 0, 32, 512, 512]]
