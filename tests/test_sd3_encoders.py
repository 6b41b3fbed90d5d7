"""SD3 / SD3.5 everything-but-the-MMDiT: tokenisation (CLIP-L, CLIP-G, T5 ids and masks), encoding
(penultimate CLIP layers, projected pooled outputs, T5, masks), the context layout, per-encoder
dropout, the ``_sd3_te.npz`` cache keys, the 16-channel VAE (parity with diffusers' converter,
scale/shift, file layouts) and loading a whole SD3 setup from a tiny SAI all-in-one file."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from library.demo.tiny_flux import write_tiny_flux_dit
from library.demo.tiny_flux_encoders import build_tiny_ae, build_tiny_t5, tiny_ae_config, write_tiny_clip_l
from library.demo.tiny_sd import build_tiny_vae
from library.demo.tiny_sd3_encoders import (
    CLIP_G_WIDTH,
    CLIP_L_WIDTH,
    CONTEXT_WIDTH,
    POOLED_WIDTH,
    TINY_T5_VOCAB,
    TinySD3Files,
    build_tiny_clip_g,
    build_tiny_sd3_clip_l,
    tiny_sd3_clip_l_state_dict,
    tiny_sd3_mmdit_state_dict,
    tiny_sd3_vae_state_dict,
    write_tiny_clip_g,
    write_tiny_sd3_checkpoint,
    write_tiny_sd3_clip_l,
    write_tiny_sd3_setup,
    write_tiny_sd3_t5,
    write_tiny_sd3_vae,
)
from library.families.sd.checkpoint import CheckpointError, VAEShape, vae_diffusers_to_ldm
from library.families.sd.tokenizer import SDXL_TOKENIZER2_ID, load_clip_tokenizer
from library.families.sd.loading import read_checkpoint
from library.families.sd3 import text as sd3_text
from library.families.sd3.loading import load_sd3_mmdit, load_sd3_models, sd3_variant
from library.families.sd3.vae import SD3_VAE_SCALE, SD3_VAE_SHIFT, decode_latents, encode_latents, load_sd3_vae
from library.families.t5_tokenizer import load_t5_tokenizer

torch.set_num_threads(1)

CAPTIONS = ["a red circle", "two blue squares on a white background, a photo of a cat in the garden"]
T5_LEN = 24


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> TinySD3Files:
    """A tiny SD3 Medium all-in-one file (MMDiT, VAE, CLIP-L, CLIP-G, T5) and its tokenizer folder."""
    return write_tiny_sd3_setup(tmp_path_factory.mktemp("sd3_setup"), "sd3_medium")


@pytest.fixture(scope="module")
def tokenizer_dir(setup):
    return setup.tokenizer_cache_dir


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    return (load_clip_tokenizer(v2=False), load_clip_tokenizer(v2=True, repo_id=SDXL_TOKENIZER2_ID),
            load_t5_tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def encoders():
    """The in-memory tiny CLIP-L, CLIP-G and T5 (what the files would hold)."""
    return build_tiny_sd3_clip_l(seed=1), build_tiny_clip_g(seed=2), build_tiny_t5(TINY_T5_VOCAB, seed=3)


@pytest.fixture(scope="module")
def ids(tokenizers):
    return sd3_text.tokenize(*tokenizers, CAPTIONS, t5_max_length=T5_LEN)


def _random_cond(batch: int = 3, seed: int = 0, *, l_width: int = 4, g_width: int = 6, t5_width: int = 16,
                 t5_len: int = 5) -> sd3_text.SD3TextConditioning:
    """A conditioning with no zero entry (|x| >= 0.5), so any zeroing shows."""
    g = torch.Generator().manual_seed(seed)

    def nonzero(*shape):
        x = torch.rand(*shape, generator=g) + 0.5
        return torch.where(torch.rand(*shape, generator=g) < 0.5, -x, x)

    width = l_width + g_width
    return sd3_text.SD3TextConditioning(
        lg_out=nonzero(batch, 77, width), lg_pooled=nonzero(batch, width), t5_out=nonzero(batch, t5_len, t5_width),
        clip_l_mask=torch.ones(batch, 77, dtype=torch.bool), clip_g_mask=torch.ones(batch, 77, dtype=torch.bool),
        t5_mask=torch.ones(batch, t5_len, dtype=torch.bool), clip_l_width=l_width)


# ------------------------------------------------------------------------------------------------
# Tokenize
# ------------------------------------------------------------------------------------------------

def test_tokenize_shapes_padding_masks_and_pickling(tokenizers, ids):
    clip_l_tok, clip_g_tok, t5_tok = tokenizers
    assert ids.keys() == {"clip_l_ids", "clip_g_ids", "t5_ids", "clip_l_mask", "clip_g_mask", "t5_mask"}
    for name in ("clip_l", "clip_g"):
        assert ids[f"{name}_ids"].shape == (2, 77) and ids[f"{name}_mask"].shape == (2, 77)
    assert ids["t5_ids"].shape == (2, T5_LEN) and ids["t5_mask"].shape == (2, T5_LEN)
    words = clip_l_tok(CAPTIONS[0]).input_ids  # BOS ... EOS
    n = len(words)
    assert words[0] == 49406 and words[-1] == 49407
    assert ids["clip_l_ids"][0, :n].tolist() == words and ids["clip_g_ids"][0, :n].tolist() == words
    assert ids["clip_l_ids"][0, n:].eq(49407).all()  # CLIP-L pads with EOS
    assert ids["clip_g_ids"][0, n:].eq(0).all()  # CLIP-G pads with "!" (id 0)
    for name in ("clip_l", "clip_g"):
        assert ids[f"{name}_mask"][0].tolist() == [1] * n + [0] * (77 - n)  # BOS and EOS count as real
    short = t5_tok(CAPTIONS[0]).input_ids
    assert ids["t5_ids"][0, : len(short)].tolist() == short and ids["t5_ids"][0, len(short):].eq(0).all()
    assert ids["t5_mask"][0].sum() == len(short)
    long = sd3_text.tokenize(*tokenizers, ["cat " * 300])
    assert long["t5_ids"][0, -1] == 1 and long["t5_mask"].all()  # truncated, still ending in EOS
    assert long["clip_l_ids"][0, -1] == 49407 and long["clip_g_ids"][0, -1] == 49407 and long["clip_g_mask"].all()
    assert long["t5_ids"].shape == (1, sd3_text.DEFAULT_T5_MAX_LENGTH) == (1, 256)

    worker_fn = pickle.loads(pickle.dumps(functools.partial(sd3_text.tokenize, *tokenizers, t5_max_length=T5_LEN)))
    again = worker_fn(CAPTIONS)
    assert all(torch.equal(again[k], ids[k]) for k in ids)

    no_t5 = sd3_text.tokenize(clip_l_tok, clip_g_tok, None, CAPTIONS, t5_max_length=T5_LEN)
    assert "t5_ids" not in no_t5 and no_t5["t5_mask"].shape == (2, T5_LEN) and not no_t5["t5_mask"].any()


# ------------------------------------------------------------------------------------------------
# Encode
# ------------------------------------------------------------------------------------------------

def test_encode_is_penultimate_layers_projected_pooled_and_t5(encoders, ids):
    clip_l, clip_g, t5 = encoders
    with torch.no_grad():
        cond = sd3_text.encode(clip_l, clip_g, t5, ids)
        ref_l = clip_l(input_ids=ids["clip_l_ids"], output_hidden_states=True)
        ref_g = clip_g(input_ids=ids["clip_g_ids"], output_hidden_states=True)
        ref_t5 = t5(input_ids=ids["t5_ids"]).last_hidden_state
        # text_embeds by hand: final layer norm at the first EOS, through text_projection.
        eos = (ids["clip_g_ids"] == 49407).int().argmax(-1)
        pooled_g = clip_g.text_projection(ref_g.last_hidden_state[torch.arange(2), eos])
    assert len(ref_l.hidden_states) == 3  # embeddings + 2 layers: [-2] is the output of layer 1 of 2
    assert cond.lg_out.shape == (2, 77, CLIP_L_WIDTH + CLIP_G_WIDTH)
    assert cond.lg_pooled.shape == (2, CLIP_L_WIDTH + CLIP_G_WIDTH) and cond.t5_out.shape == (2, T5_LEN, CONTEXT_WIDTH)
    torch.testing.assert_close(cond.lg_out[..., :CLIP_L_WIDTH], ref_l.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(cond.lg_out[..., CLIP_L_WIDTH:], ref_g.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(cond.lg_pooled[:, :CLIP_L_WIDTH], ref_l.text_embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.lg_pooled[:, CLIP_L_WIDTH:], ref_g.text_embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.lg_pooled[:, CLIP_L_WIDTH:], pooled_g, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref_l.hidden_states[-2], ref_l.last_hidden_state)  # not the last layer
    torch.testing.assert_close(cond.t5_out, ref_t5, rtol=0, atol=0)
    assert cond.clip_l_width == CLIP_L_WIDTH and cond.pooled is cond.lg_pooled
    for name in ("clip_l_mask", "clip_g_mask", "t5_mask"):
        got = getattr(cond, name)
        assert got.dtype == torch.bool and torch.equal(got, ids[name].bool())
    # Without the flags the padding positions keep their (nonzero) outputs.
    assert cond.lg_out[0, ~ids["clip_l_mask"][0].bool()].abs().sum() > 0
    assert cond.t5_out[0, ~ids["t5_mask"][0].bool()].abs().sum() > 0


def test_encode_attention_masks_zero_the_padding(encoders, ids):
    clip_l, clip_g, t5 = encoders
    l_pad, g_pad, t5_real = ~ids["clip_l_mask"].bool(), ~ids["clip_g_mask"].bool(), ids["t5_mask"].bool()
    with torch.no_grad():
        plain = sd3_text.encode(clip_l, clip_g, t5, ids)
        masked = sd3_text.encode(clip_l, clip_g, t5, ids, apply_lg_attn_mask=True, apply_t5_attn_mask=True)
        ref_t5 = t5(input_ids=ids["t5_ids"], attention_mask=ids["t5_mask"]).last_hidden_state
        # T5 with its mask: real positions do not depend on what the padding ids are.
        other = dict(ids, t5_ids=torch.where(t5_real, ids["t5_ids"], torch.full_like(ids["t5_ids"], 7)))
        masked_other = sd3_text.encode(clip_l, clip_g, t5, other, apply_t5_attn_mask=True)
        plain_other = sd3_text.encode(clip_l, clip_g, t5, other)
    assert masked.lg_out[..., :CLIP_L_WIDTH][l_pad].eq(0).all() and masked.lg_out[..., CLIP_L_WIDTH:][g_pad].eq(0).all()
    # CLIP is causal: real tokens and the pooled outputs are the same with or without the mask.
    torch.testing.assert_close(masked.lg_out[..., :CLIP_L_WIDTH][~l_pad], plain.lg_out[..., :CLIP_L_WIDTH][~l_pad],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.lg_out[..., CLIP_L_WIDTH:][~g_pad], plain.lg_out[..., CLIP_L_WIDTH:][~g_pad],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.lg_pooled, plain.lg_pooled, rtol=1e-5, atol=1e-6)
    assert masked.t5_out[~t5_real].eq(0).all()
    torch.testing.assert_close(masked.t5_out[t5_real], ref_t5[t5_real], rtol=0, atol=0)
    torch.testing.assert_close(masked_other.t5_out[t5_real], masked.t5_out[t5_real], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain_other.t5_out[t5_real], plain.t5_out[t5_real])  # unmasked T5 sees the padding


def test_encode_without_t5_and_errors(encoders, tokenizers):
    clip_l, clip_g, _ = encoders
    ids = sd3_text.tokenize(tokenizers[0], tokenizers[1], None, CAPTIONS, t5_max_length=T5_LEN)
    with torch.no_grad():
        cond = sd3_text.encode(clip_l, clip_g, None, ids, t5_width=CONTEXT_WIDTH)
        real = sd3_text.encode(clip_l, clip_g, None, ids)
    assert cond.t5_out.shape == (2, T5_LEN, CONTEXT_WIDTH) and not cond.t5_out.any() and not cond.t5_mask.any()
    assert real.t5_out.shape == (2, T5_LEN, sd3_text.T5XXL_WIDTH)
    assert cond.context().shape == (2, 77 + T5_LEN, CONTEXT_WIDTH)
    unprojected = CLIPTextModel(clip_l.config)
    with pytest.raises(TypeError, match="with_projection=True"):
        sd3_text.encode(unprojected, clip_g, None, ids)
    with pytest.raises(ValueError, match="CLIP-L and CLIP-G"):
        sd3_text.encode(clip_l, None, None, ids)
    with pytest.raises(ValueError, match="t5_ids"):
        sd3_text.encode(clip_l, clip_g, encoders[2], ids)


def test_context_layout_pooled_and_to():
    cond = _random_cond(batch=2, l_width=4, g_width=6, t5_width=16, t5_len=5)
    context = cond.context()
    assert context.shape == (2, 77 + 5, 16)
    assert torch.equal(context[:, :77, :10], cond.lg_out)  # CLIP-L then CLIP-G channels
    assert context[:, :77, 10:].eq(0).all()  # zero padding up to the T5 width
    assert torch.equal(context[:, 77:], cond.t5_out)  # then T5 along the sequence
    assert cond.pooled is cond.lg_pooled
    half = cond.to("cpu", torch.float16)
    assert half.lg_out.dtype == half.lg_pooled.dtype == half.t5_out.dtype == torch.float16
    assert half.t5_mask.dtype == half.clip_l_mask.dtype == half.clip_g_mask.dtype == torch.bool
    assert half.clip_l_width == 4 and half.context().dtype == torch.float16
    too_wide = _random_cond(l_width=10, g_width=10, t5_width=16)
    with pytest.raises(ValueError, match="exceeds the T5 width"):
        too_wide.context()


# ------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["clip_l", "clip_g", "t5"])
def test_dropout_zeroes_exactly_the_right_slices(which):
    cond = _random_cond(batch=3)
    rates = {"clip_l_rate": 0.0, "clip_g_rate": 0.0, "t5_rate": 0.0, f"{which}_rate": 1.0}
    before = {k: v.clone() for k, v in sd3_text.to_cache(cond).items()}
    out = sd3_text.apply_dropout(cond, **rates)
    l, g = slice(0, 4), slice(4, 10)
    dropped = {"clip_l": which == "clip_l", "clip_g": which == "clip_g", "t5": which == "t5"}
    for name, part, pooled_part in (("clip_l", out.lg_out[..., l], out.lg_pooled[:, l]),
                                    ("clip_g", out.lg_out[..., g], out.lg_pooled[:, g])):
        src = slice(0, 4) if name == "clip_l" else slice(4, 10)
        if dropped[name]:
            assert part.eq(0).all() and pooled_part.eq(0).all() and not getattr(out, f"{name}_mask").any()
        else:
            assert torch.equal(part, cond.lg_out[..., src]) and torch.equal(pooled_part, cond.lg_pooled[:, src])
            assert getattr(out, f"{name}_mask").all()
    if dropped["t5"]:
        assert out.t5_out.eq(0).all() and not out.t5_mask.any()
    else:
        assert torch.equal(out.t5_out, cond.t5_out) and out.t5_mask.all()
    # The input is untouched (it may be an in-memory cache entry).
    assert all(torch.equal(v, before[k]) for k, v in sd3_text.to_cache(cond).items())


def test_dropout_draw_order_determinism_and_statistics():
    cond = _random_cond(batch=6)
    torch.manual_seed(123)
    first = sd3_text.apply_dropout(cond, clip_l_rate=0.3, clip_g_rate=0.5, t5_rate=0.7)
    torch.manual_seed(123)
    second = sd3_text.apply_dropout(cond, clip_l_rate=0.3, clip_g_rate=0.5, t5_rate=0.7)
    assert all(torch.equal(a, b) for a, b in zip(sd3_text.to_cache(first).values(), sd3_text.to_cache(second).values()))
    # The documented draw: torch.rand(B, 3) from the global CPU RNG, columns L, G, T5.
    torch.manual_seed(123)
    keep = torch.rand(6, 3) >= torch.tensor([0.3, 0.5, 0.7])
    assert torch.equal(first.lg_pooled[:, 0] != 0, keep[:, 0]) and torch.equal(first.lg_pooled[:, 4] != 0, keep[:, 1])
    assert torch.equal(first.t5_out[:, 0, 0] != 0, keep[:, 2]) and torch.equal(first.clip_l_mask[:, 0], keep[:, 0])
    # The same stream whatever the rates: one draw per sample per encoder.
    torch.manual_seed(5)
    sd3_text.apply_dropout(cond, clip_l_rate=0.1)
    after_one = torch.rand(1)
    torch.manual_seed(5)
    torch.rand(6, 3)
    assert torch.equal(after_one, torch.rand(1))
    generator = torch.Generator().manual_seed(9)
    a = sd3_text.apply_dropout(cond, t5_rate=0.5, generator=generator)
    b = sd3_text.apply_dropout(cond, t5_rate=0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.t5_out, b.t5_out)
    # All rates zero: nothing drawn, the same object back.
    state = torch.get_rng_state()
    assert sd3_text.apply_dropout(cond) is cond and torch.equal(state, torch.get_rng_state())
    # Frequencies, per encoder, independently.
    big = _random_cond(batch=4000, t5_len=1, t5_width=16)
    big = sd3_text.SD3TextConditioning(big.lg_out[:, :1], big.lg_pooled, big.t5_out, big.clip_l_mask,
                                       big.clip_g_mask, big.t5_mask, clip_l_width=4)
    torch.manual_seed(0)
    out = sd3_text.apply_dropout(big, clip_l_rate=0.2, clip_g_rate=0.5, t5_rate=0.8)
    drop_l, drop_g, drop_t5 = out.lg_pooled[:, 0] == 0, out.lg_pooled[:, 4] == 0, out.t5_out[:, 0, 0] == 0
    for dropped, rate in ((drop_l, 0.2), (drop_g, 0.5), (drop_t5, 0.8)):
        assert abs(dropped.float().mean().item() - rate) < 0.03
    both = (drop_l & drop_g).float().mean().item()
    assert abs(both - 0.1) < 0.02  # independent draws
    with pytest.raises(ValueError, match="--t5_dropout_rate"):
        sd3_text.apply_dropout(cond, t5_rate=1.5)


def test_dropout_on_cached_outputs(encoders, ids):
    clip_l, clip_g, t5 = encoders
    with torch.no_grad():
        fresh = sd3_text.encode(clip_l, clip_g, t5, ids)
    # What a disk cache gives back: float32 arrays and bool masks, one sample each, stacked.
    cached = {k: v.detach().float() if v.is_floating_point() else v for k, v in sd3_text.to_cache(fresh).items()}
    restored = sd3_text.from_cache(cached, clip_l_width=CLIP_L_WIDTH).to("cpu", torch.bfloat16)
    torch.manual_seed(1)
    dropped_fresh = sd3_text.apply_dropout(fresh, clip_l_rate=0.5, clip_g_rate=0.5, t5_rate=0.5)
    torch.manual_seed(1)
    dropped_cached = sd3_text.apply_dropout(restored, clip_l_rate=0.5, clip_g_rate=0.5, t5_rate=0.5)
    assert dropped_cached.lg_out.dtype == torch.bfloat16
    for a, b in ((dropped_fresh.lg_out, dropped_cached.lg_out), (dropped_fresh.lg_pooled, dropped_cached.lg_pooled),
                 (dropped_fresh.t5_out, dropped_cached.t5_out)):
        assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(a.to(torch.bfloat16), b)


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------

def test_cache_round_trip_keys_and_clip_l_width():
    cond = _random_cond(batch=2)
    cached = sd3_text.to_cache(cond)
    assert tuple(cached) == sd3_text.CACHE_KEYS == ("lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask",
                                                    "clip_g_attn_mask", "t5_attn_mask")
    assert all(cached[k].dtype == torch.bool for k in ("clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask"))
    as_float = {k: v.float() for k, v in cached.items()}  # masks of another dtype are accepted
    back = sd3_text.from_cache(as_float, clip_l_width=4)
    assert back.clip_l_width == 4
    for key, value in sd3_text.to_cache(back).items():
        assert value.dtype == cached[key].dtype and torch.equal(value, cached[key]), key
    with pytest.raises(ValueError, match="pass clip_l_width"):
        sd3_text.from_cache(cached)  # 10 channels: not the real 2048, the width must be told
    real = _random_cond(batch=1, l_width=768, g_width=1280, t5_width=4096, t5_len=2)
    assert sd3_text.from_cache(sd3_text.to_cache(real)).clip_l_width == 768
    with pytest.raises(KeyError, match="t5_attn_mask"):
        sd3_text.from_cache({k: v for k, v in cached.items() if k != "t5_attn_mask"}, clip_l_width=4)


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------

def _images(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def sd3_like_file(tmp_path_factory):
    """The VAE under first_stage_model. next to tensors of other models, as in an SD3 single file."""
    state_dict = tiny_sd3_vae_state_dict(seed=3)
    state_dict["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(8, 16, 2, 2)
    state_dict["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    path = tmp_path_factory.mktemp("sd3") / "sd3.safetensors"
    save_file(state_dict, str(path))
    return path


def test_vae_matches_diffusers_converter(sd3_like_file):
    ours = load_sd3_vae(sd3_like_file)
    reference = AutoencoderKL(**tiny_ae_config()).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(sd3_like_file)), tiny_ae_config()), strict=True)
    assert ours.config.latent_channels == 16 and not ours.config.use_quant_conv and not ours.config.use_post_quant_conv
    assert ours.config.scaling_factor == SD3_VAE_SCALE == 1.5305 and ours.config.shift_factor == SD3_VAE_SHIFT == 0.0609
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.decode(z).sample, reference.decode(z).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["state_dict", "", "vae.", "diffusers_file", "diffusers_folder"])
def test_vae_other_sources_load_the_same(sd3_like_file, tmp_path, layout):
    expected = load_sd3_vae(sd3_like_file).state_dict()
    if layout == "state_dict":
        source = load_file(str(sd3_like_file))
    elif layout == "diffusers_folder":
        build_tiny_ae(seed=3).save_pretrained(str(tmp_path / "vae"))
        source = tmp_path / "vae"
    elif layout == "diffusers_file":
        source = tmp_path / "vae_diffusers.safetensors"
        save_file({k: v.contiguous() for k, v in build_tiny_ae(seed=3).state_dict().items()}, str(source))
    else:
        source = write_tiny_sd3_vae(tmp_path / "vae.safetensors", seed=3, prefix=layout)
    vae = load_sd3_vae(source, name="the SD3 file")
    assert vae.config.scaling_factor == SD3_VAE_SCALE and vae.config.shift_factor == SD3_VAE_SHIFT
    loaded = vae.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_encode_decode_latents_scale_and_shift(sd3_like_file):
    vae = load_sd3_vae(sd3_like_file)
    x = _images(2)
    latents = encode_latents(vae, x, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)
        assert latents.shape == (2, 16, 4, 4) and latents.dtype == torch.float32
        torch.testing.assert_close(decode_latents(vae, latents), vae.decode(z).sample, rtol=1e-5, atol=1e-5)
    bf16 = load_sd3_vae(sd3_like_file, dtype=torch.bfloat16, mmap=False)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert encode_latents(bf16, x).dtype == torch.float32 and decode_latents(bf16, latents).dtype == torch.float32


def test_vae_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vae"):
        load_sd3_vae(tmp_path / "missing.safetensors")
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 8)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"lora\.safetensors holds no VAE \(--vae\).*LoRA"):
        load_sd3_vae(tmp_path / "lora.safetensors")
    clip = write_tiny_clip_g(tmp_path / "clip_g.safetensors")
    with pytest.raises(CheckpointError, match="holds no VAE.*CLIP text encoder"):
        load_sd3_vae(clip)
    sd_vae = build_tiny_vae(seed=0)
    save_file(vae_diffusers_to_ldm(sd_vae.state_dict(), VAEShape.from_diffusers_config(sd_vae.config)),
              str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(CheckpointError, match="4-channel VAE.*SD3 needs its 16-channel VAE"):
        load_sd3_vae(tmp_path / "sd_vae.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors holds no VAE \\(--pretrained_model_name_or_path\\)"):
        load_sd3_vae({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)},
                     name="model.safetensors", flag="--pretrained_model_name_or_path")


# ------------------------------------------------------------------------------------------------
# Loading a whole setup
# ------------------------------------------------------------------------------------------------

def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key].float(), tensor.float()), key


def test_load_all_in_one_file(setup):
    models = load_sd3_models(setup.checkpoint, tokenizer_cache_dir=setup.tokenizer_cache_dir, dtype=torch.bfloat16)
    assert models.variant == "sd3_medium" and models.config.qk_norm is None
    assert models.config.context_in_dim == CONTEXT_WIDTH and models.config.adm_in_channels == POOLED_WIDTH
    assert models.mmdit.dtype == torch.bfloat16 and next(models.vae.parameters()).dtype == torch.float32
    assert models.clip_l.dtype == models.clip_g.dtype == models.t5.dtype == torch.bfloat16
    assert type(models.clip_l).__name__ == type(models.clip_g).__name__ == "CLIPTextModelWithProjection"
    assert models.clip_l.config.hidden_act == "quick_gelu" and models.clip_g.config.hidden_act == "gelu"
    assert models.clip_l_width == CLIP_L_WIDTH and models.context_width == CONTEXT_WIDTH
    # Every part holds exactly the weights written (bf16 of them).
    expected_mmdit = tiny_sd3_mmdit_state_dict("sd3_medium", seed=0)
    for key, tensor in models.mmdit.state_dict().items():
        assert torch.equal(tensor, expected_mmdit[key].to(torch.bfloat16)), key
    _assert_same_weights(models.clip_l, build_tiny_sd3_clip_l(seed=0).to(torch.bfloat16))
    _assert_same_weights(models.clip_g, build_tiny_clip_g(seed=0).to(torch.bfloat16))
    _assert_same_weights(models.t5, build_tiny_t5(TINY_T5_VOCAB, seed=0).to(torch.bfloat16))
    _assert_same_weights(models.vae, build_tiny_ae(seed=0))
    assert models.vae.config.scaling_factor == SD3_VAE_SCALE
    # Tokenizers: CLIP-L pads with EOS, CLIP-G with "!" (0), T5 from the folder.
    assert models.clip_l_tokenizer.pad_token_id == 49407 and models.clip_g_tokenizer.pad_token_id == 0
    assert len(models.t5_tokenizer) <= TINY_T5_VOCAB
    # The pieces fit together: conditioning -> MMDiT forward.
    ids = sd3_text.tokenize(models.clip_l_tokenizer, models.clip_g_tokenizer, models.t5_tokenizer, CAPTIONS,
                            t5_max_length=8)
    with torch.no_grad():
        cond = sd3_text.encode(models.clip_l, models.clip_g, models.t5, ids)
        out = models.mmdit(torch.randn(2, 16, 8, 8, dtype=torch.bfloat16), torch.full((2,), 500.0), cond.context(),
                           cond.pooled)
    assert cond.context().shape == (2, 77 + 8, CONTEXT_WIDTH) and out.shape == (2, 16, 8, 8)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("variant", ["sd3_medium", "sd35_large", "sd35_medium"])
def test_variant_from_the_weights(tmp_path, variant):
    path = write_tiny_sd3_checkpoint(tmp_path / "model.safetensors", variant, with_text_encoders=False)
    mmdit = load_sd3_mmdit(read_checkpoint(path), path)
    assert sd3_variant(mmdit.config) == variant
    assert (mmdit.config.qk_norm is None) == (variant == "sd3_medium")
    assert bool(mmdit.config.x_block_self_attn_layers) == (variant == "sd35_medium")


def test_separate_files_override_the_file(setup, tmp_path):
    files = {
        "clip_l_path": write_tiny_sd3_clip_l(tmp_path / "clip_l.safetensors", seed=7),
        "clip_g_path": write_tiny_clip_g(tmp_path / "clip_g.safetensors", seed=8, dtype=torch.float16),
        "t5_path": write_tiny_sd3_t5(tmp_path / "t5xxl.safetensors", seed=9),
        "vae_path": write_tiny_sd3_vae(tmp_path / "vae.safetensors", seed=10),
    }
    models = load_sd3_models(setup.checkpoint, tokenizer_cache_dir=setup.tokenizer_cache_dir, mmap=False, **files)
    _assert_same_weights(models.clip_l, build_tiny_sd3_clip_l(seed=7))
    _assert_same_weights(models.clip_g, build_tiny_clip_g(seed=8).half())
    _assert_same_weights(models.t5, build_tiny_t5(TINY_T5_VOCAB, seed=9))
    _assert_same_weights(models.vae, build_tiny_ae(seed=10))
    # One override alone replaces only that encoder.
    only_g = load_sd3_models(setup.checkpoint, tokenizer_cache_dir=setup.tokenizer_cache_dir,
                             clip_g_path=files["clip_g_path"])
    _assert_same_weights(only_g.clip_l, build_tiny_sd3_clip_l(seed=0))
    _assert_same_weights(only_g.clip_g, build_tiny_clip_g(seed=8).half())


def test_file_without_text_encoders_needs_the_flags(tmp_path, setup):
    bare = write_tiny_sd3_checkpoint(tmp_path / "sd3_medium.safetensors", with_text_encoders=False)
    clip_l = write_tiny_sd3_clip_l(tmp_path / "clip_l.safetensors")
    clip_g = write_tiny_clip_g(tmp_path / "clip_g.safetensors")
    with pytest.raises(CheckpointError, match=r"sd3_medium\.safetensors holds no CLIP-L.*give it with --clip_l"):
        load_sd3_models(bare, tokenizer_cache_dir=setup.tokenizer_cache_dir)
    with pytest.raises(CheckpointError, match="holds no CLIP-G.*--clip_g"):
        load_sd3_models(bare, clip_l_path=clip_l, tokenizer_cache_dir=setup.tokenizer_cache_dir)
    # No T5 anywhere: None, and the conditioning uses zeros of the context width.
    models = load_sd3_models(bare, clip_l_path=clip_l, clip_g_path=clip_g,
                             tokenizer_cache_dir=setup.tokenizer_cache_dir)
    assert models.t5 is None and models.t5_tokenizer is not None
    empty = tmp_path / "no_tokenizers"
    without = load_sd3_models(bare, clip_l_path=clip_l, clip_g_path=clip_g, tokenizer_cache_dir=empty)
    assert without.t5 is None and without.t5_tokenizer is None  # no T5 folder either: fine without T5
    ids = sd3_text.tokenize(without.clip_l_tokenizer, without.clip_g_tokenizer, None, CAPTIONS, t5_max_length=8)
    with torch.no_grad():
        cond = sd3_text.encode(without.clip_l, without.clip_g, None, ids, t5_width=without.context_width)
    assert cond.t5_out.shape == (2, 8, CONTEXT_WIDTH) and not cond.t5_out.any()
    # The file's CLIPs without T5 (sd3_medium_incl_clips): T5 from --t5xxl, or none.
    clips_only = write_tiny_sd3_checkpoint(tmp_path / "incl_clips.safetensors", with_t5=False)
    assert load_sd3_models(clips_only, tokenizer_cache_dir=setup.tokenizer_cache_dir).t5 is None
    t5 = write_tiny_sd3_t5(tmp_path / "t5.safetensors", seed=4)
    assert load_sd3_models(clips_only, t5_path=t5, tokenizer_cache_dir=setup.tokenizer_cache_dir).t5 is not None
    # Without the VAE.
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(str(bare)).items() if not k.startswith("first_stage_model.")}, str(no_vae))
    with pytest.raises(CheckpointError, match="holds no VAE.*--vae"):
        load_sd3_models(no_vae, clip_l_path=clip_l, clip_g_path=clip_g)
    vae = write_tiny_sd3_vae(tmp_path / "vae.safetensors", prefix="first_stage_model.")
    assert load_sd3_models(no_vae, clip_l_path=clip_l, clip_g_path=clip_g, vae_path=vae,
                           tokenizer_cache_dir=setup.tokenizer_cache_dir).vae is not None


def test_clip_l_without_projection_gets_the_identity(tmp_path, setup):
    tensors = tiny_sd3_clip_l_state_dict(seed=2)
    del tensors["text_projection.weight"]
    save_file(tensors, str(tmp_path / "clip_l.safetensors"))
    models = load_sd3_models(setup.checkpoint, clip_l_path=tmp_path / "clip_l.safetensors",
                             tokenizer_cache_dir=setup.tokenizer_cache_dir)
    assert type(models.clip_l).__name__ == "CLIPTextModelWithProjection"
    assert torch.equal(models.clip_l.text_projection.weight, torch.eye(CLIP_L_WIDTH))
    reference = build_tiny_sd3_clip_l(seed=2)
    ids = sd3_text.tokenize(models.clip_l_tokenizer, models.clip_g_tokenizer, None, CAPTIONS)
    with torch.no_grad():
        ours = models.clip_l(input_ids=ids["clip_l_ids"], output_hidden_states=True)
        ref = reference.text_model(input_ids=ids["clip_l_ids"], output_hidden_states=True)
    torch.testing.assert_close(ours.text_embeds, ref.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(ours.hidden_states[-2], ref.hidden_states[-2], rtol=0, atol=0)


def test_wrong_model_files(tmp_path, setup):
    z = torch.zeros(2, 2)
    cases = {
        "lora.safetensors": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": z}, "--network_weights"),
        "sdxl.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": z,
                              "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": z},
                             "sdxl_train_network.py"),
        "sd15.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": z,
                              "cond_stage_model.transformer.text_model.final_layer_norm.weight": z},
                             "train_network.py"),
        "diffusers.safetensors": ({"transformer_blocks.0.attn.to_q.weight": z, "context_embedder.weight": z},
                                  "Diffusers SD3Transformer2DModel"),
        "t5.safetensors": ({"encoder.block.0.layer.0.SelfAttention.q.weight": z}, "T5 text encoder"),
    }
    for name, (tensors, words) in cases.items():
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=f"{name}: not an SD3/SD3.5 model file.*{words}"):
            load_sd3_models(tmp_path / name)
    flux = write_tiny_flux_dit(tmp_path / "flux.safetensors", prefix="model.diffusion_model.")
    with pytest.raises(CheckpointError, match="FLUX.1 DiT: use flux_train_network.py"):
        load_sd3_models(flux)
    with pytest.raises(FileNotFoundError, match="--pretrained_model_name_or_path"):
        load_sd3_models(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_sd3_models(tmp_path)
    # Encoders that do not fit the MMDiT: FLUX's tiny CLIP-L is 32 wide (pooled 32 + 16 != 28).
    flux_clip = write_tiny_clip_l(tmp_path / "flux_clip_l.safetensors")
    with pytest.raises(CheckpointError, match="do not fit this SD3 model.*pooled input"):
        load_sd3_models(setup.checkpoint, clip_l_path=flux_clip, tokenizer_cache_dir=setup.tokenizer_cache_dir)
