"""The offline CLIP tokenizer, 75/150/225-token chunking and the chunked text encoding."""

from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn

from library.families.sd import text
from library.families.sd import tokenizer as tokenizer_module
from library.families.sd.loading import load_sd_models
from library.families.sd.tokenizer import build_clip_tokenizer, load_clip_tokenizer
from library.demo.tiny_sd import build_tiny_sd

BOS, EOS = 49406, 49407
LONG = "a very detailed painting of a red fox sitting in a snowy forest at dawn, " * 8  # well over 150 tokens
TRICKY = [
    "a photo of a cat",
    "Hello,   World!!  ... ?!",
    "naïve café, Ünïcödé ÀÉÎÕÜ ß",
    "日本語のテキスト 中文 한국어",
    "Ελληνικά русский العربية हिन्दी",
    "emoji 😀🐱👍🏽 family👨‍👩‍👧",
    "don't won't it's I'M we'll you've they'd",
    "masterpiece, (best quality:1.2), [foo|bar] {x} 1girl 123456 3.14 #tag @user",
    "$%^&*()_+-=~`<>?/\\|",
    "tab\tnew\nline   spaces",
    "x" * 300,
    LONG,
]


@pytest.fixture(scope="module")
def sd1_tokenizer():
    return build_clip_tokenizer(v2=False)


@pytest.fixture(scope="module")
def sd2_tokenizer():
    return build_clip_tokenizer(v2=True)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def tiny_sd1_text_encoder():
    return build_tiny_sd(v2=False).text_encoder


# --- tokenizer -------------------------------------------------------------------------------

def test_built_tokenizer_has_clip_vocabulary(sd1_tokenizer, sd2_tokenizer):
    assert len(sd1_tokenizer) == 49408
    assert sd1_tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (sd1_tokenizer.bos_token_id, sd1_tokenizer.eos_token_id, sd1_tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert (sd2_tokenizer.bos_token_id, sd2_tokenizer.eos_token_id, sd2_tokenizer.pad_token_id) == (BOS, EOS, 0)
    assert sd2_tokenizer.convert_ids_to_tokens(0) == "!"
    assert sd1_tokenizer.model_max_length == sd2_tokenizer.model_max_length == 77


@pytest.mark.parametrize("caption", TRICKY)
def test_tokens_equal_open_clip(sd1_tokenizer, open_clip_tokenizer, caption):
    # open_clip also runs ftfy and unescapes HTML before tokenising, the transformers tokenizer
    # does not (by design, see library/families/sd/tokenizer.py): compare on the cleaned text.
    reference = open_clip_tokenizer.encode(caption)
    cleaned = get_clean_fn("lower")(caption)
    assert sd1_tokenizer(cleaned, add_special_tokens=False).input_ids == reference
    assert len(reference) > 0


def test_cache_dir_is_built_then_reused(tmp_path, monkeypatch, tiny_sd2_ckpt):
    first = load_clip_tokenizer(v2=False, cache_dir=tmp_path)
    folder = tmp_path / "openai_clip-vit-large-patch14"
    assert (folder / "tokenizer.json").is_file()

    def no_build(**_):
        raise AssertionError("the tokenizer should come from the cache folder")

    monkeypatch.setattr(tokenizer_module, "build_clip_tokenizer", no_build)
    again = load_clip_tokenizer(v2=False, cache_dir=tmp_path)
    assert again(LONG).input_ids == first(LONG).input_ids
    assert again.pad_token_id == EOS

    monkeypatch.undo()
    models = load_sd_models(tiny_sd2_ckpt, v2=True, tokenizer_cache_dir=tmp_path)
    assert (tmp_path / "stabilityai_stable-diffusion-2" / "tokenizer.json").is_file()
    assert models.tokenizer.pad_token_id == 0


def test_diffusers_folder_tokenizer_is_used(tiny_sd1_diffusers):
    tok = load_clip_tokenizer(v2=False, diffusers_dir=tiny_sd1_diffusers)
    assert tok.name_or_path == str(tiny_sd1_diffusers / "tokenizer")


# --- tokenize --------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len, chunks", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_tokenize_shapes(sd1_tokenizer, max_len, chunks):
    ids = text.tokenize(sd1_tokenizer, ["a cat", LONG], max_len)
    assert ids.shape == (2, chunks, 77) and ids.dtype == torch.long
    assert (ids[:, :, 0] == BOS).all()
    assert (ids[:, :, -1] == EOS).all()  # SD1 pads with EOS, so every chunk ends with EOS


def test_tokenize_rejects_other_lengths(sd1_tokenizer):
    with pytest.raises(ValueError, match="max_token_length must be 75, 150 or 225"):
        text.tokenize(sd1_tokenizer, ["a cat"], 100)


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_one_chunk_equals_plain_tokenisation(sd1_tokenizer, sd2_tokenizer, v2):
    tok = sd2_tokenizer if v2 else sd1_tokenizer
    captions = ["a cat", LONG, "word " * 75, ""]
    plain = tok(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    assert torch.equal(text.tokenize(tok, captions, None)[:, 0], plain)


def test_sd2_chunk_ends(sd2_tokenizer):
    # "cat" is one token: 100 of them fill chunk 0, a quarter of chunk 1 and leave chunk 2 empty.
    ids = text.tokenize(sd2_tokenizer, ["cat " * 100], 225)[0]
    cat = sd2_tokenizer("cat", add_special_tokens=False).input_ids[0]
    assert ids[0].tolist() == [BOS] + [cat] * 75 + [EOS]  # text runs on: the chunk gets its own EOS
    assert ids[1].tolist() == [BOS] + [cat] * 25 + [EOS] + [0] * 50  # EOS inside, ends with pad
    empty = text.tokenize(sd2_tokenizer, [""], None)[0, 0]
    assert ids[2].tolist() == empty.tolist() == [BOS, EOS] + [0] * 75  # padding-only chunk reads as ""


def test_sd1_long_caption_is_cut_after_75n_tokens(sd1_tokenizer):
    ids = text.tokenize(sd1_tokenizer, ["cat " * 400], 150)[0]
    cat = sd1_tokenizer("cat", add_special_tokens=False).input_ids[0]
    assert ids.tolist() == [[BOS] + [cat] * 75 + [EOS]] * 2


# --- encode ----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len, length", [(None, 77), (150, 152), (225, 227)])
@torch.no_grad()
def test_encode_shapes(sd1_tokenizer, tiny_sd1_text_encoder, max_len, length):
    ids = text.tokenize(sd1_tokenizer, ["a cat", LONG], max_len)
    out = text.encode(tiny_sd1_text_encoder, ids, clip_skip=None, max_token_length=max_len)
    assert out.shape == (2, length, 32)


@torch.no_grad()
def test_encode_joins_chunks(sd1_tokenizer, tiny_sd1_text_encoder):
    te = tiny_sd1_text_encoder
    ids = text.tokenize(sd1_tokenizer, [LONG, "a cat"], 150)
    joined = text.encode(te, ids, clip_skip=None, max_token_length=150)
    one = text.encode(te, text.tokenize(sd1_tokenizer, [LONG, "a cat"], None), clip_skip=None, max_token_length=None)
    # The first chunk is the same 77 tokens either way: BOS + the first 75 tokens agree exactly.
    torch.testing.assert_close(joined[:, :76], one[:, :76], rtol=1e-6, atol=1e-6)
    second = te(ids[:, 1]).last_hidden_state
    torch.testing.assert_close(joined[:, 76:151], second[:, 1:76], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(joined[:, 151], second[:, 76], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_clip_skip(sd1_tokenizer, tiny_sd1_text_encoder):
    te = tiny_sd1_text_encoder
    ids = text.tokenize(sd1_tokenizer, ["a cat on a mat"], None)
    last = text.encode(te, ids, clip_skip=None)
    torch.testing.assert_close(text.encode(te, ids, clip_skip=1), last)
    skipped = text.encode(te, ids, clip_skip=2)
    assert (skipped - last).abs().max() > 1e-3
    states = te(ids[:, 0], output_hidden_states=True).hidden_states
    torch.testing.assert_close(skipped, te.final_layer_norm(states[-2]) if hasattr(te, "final_layer_norm")
                               else te.text_model.final_layer_norm(states[-2]))
    with pytest.raises(ValueError, match="clip_skip=4 is more than the text encoder's 3 layers"):
        text.encode(te, ids, clip_skip=4)
    with pytest.raises(ValueError, match="tokenize and encode with the same max_token_length"):
        text.encode(te, ids, clip_skip=None, max_token_length=150)


@torch.no_grad()
def test_sd2_encode_is_the_shortened_encoder_output(sd2_tokenizer):
    te = build_tiny_sd(v2=True).text_encoder
    ids = text.tokenize(sd2_tokenizer, ["a cat", LONG], None)
    torch.testing.assert_close(text.encode(te, ids, clip_skip=None), te(ids[:, 0]).last_hidden_state)
