"""FLUX.1 autoencoder and text encoders from the separate files users have: parity with diffusers'
own VAE converter, exact write-back, CLIP-L / T5 files (prefixes, fp16/bf16/fp8) against the
models that wrote them, the full-size T5-XXL config and LoRA names on meta, the T5 tokenizer
folder, tokenisation and encoding, and the errors users see."""

from __future__ import annotations

import functools
import logging
import pickle

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention, T5DenseGatedActDense

from library.demo.tiny_flux_encoders import (
    build_tiny_ae,
    build_tiny_clip_l,
    build_tiny_t5,
    tiny_ae_config,
    train_tiny_spiece,
    write_tiny_ae,
    write_tiny_clip_l,
    write_tiny_t5,
    write_tiny_t5_tokenizer,
)
from library.demo.tiny_sd import build_tiny_vae
from library.families.flux import text as flux_text
from library.families.flux.autoencoder import (
    AE_SCALE,
    AE_SHIFT,
    ae_state_dict_bfl,
    decode_latents,
    encode_latents,
    load_flux_ae,
)
from library.families.sd.checkpoint import CheckpointError, VAEShape, vae_diffusers_to_ldm
from library.families.sd.tokenizer import load_clip_tokenizer
from library.families.t5_tokenizer import load_t5_tokenizer
from library.families.text_encoder_files import (
    T5Shape,
    infer_t5_shape,
    load_clip_l,
    load_t5xxl,
    t5_state_dict,
)
from tests.reference import load_reference

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    """A --tokenizer_cache_dir holding the tiny google_t5-v1_1-xxl tokenizer."""
    root = tmp_path_factory.mktemp("tokenizers")
    write_tiny_t5_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def t5_tokenizer(t5_tokenizer_dir):
    return load_t5_tokenizer(t5_tokenizer_dir)


@pytest.fixture(scope="module")
def clip_tokenizer():
    return load_clip_tokenizer(v2=False)


@pytest.fixture(scope="module")
def vocab(t5_tokenizer) -> int:
    return len(t5_tokenizer)


@pytest.fixture(scope="module")
def ae_file(tmp_path_factory):
    return write_tiny_ae(tmp_path_factory.mktemp("ae") / "ae.safetensors", seed=3)


def _images(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Autoencoder
# ------------------------------------------------------------------------------------------------

def test_ae_matches_diffusers_converter(ae_file):
    ours = load_flux_ae(ae_file)
    reference = AutoencoderKL(**tiny_ae_config()).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(ae_file)), tiny_ae_config()), strict=True)
    assert ours.config.latent_channels == 16 and not ours.config.use_quant_conv and not ours.config.use_post_quant_conv
    assert tuple(ours.config.block_out_channels) == (32, 32, 32, 32) and ours.config.layers_per_block == 2
    assert ours.config.scaling_factor == AE_SCALE and ours.config.shift_factor == AE_SHIFT
    x = _images()
    with torch.no_grad():
        ours_mean, ref_mean = ours.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean
        torch.testing.assert_close(ours_mean, ref_mean, rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.decode(z).sample, reference.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_ae_file_layout_and_exact_round_trip(ae_file):
    stored = load_file(str(ae_file))
    assert "decoder.up.3.block.2.norm2.bias" in stored and "encoder.down.0.block.0.conv1.weight" in stored
    assert stored["encoder.conv_out.weight"].shape[0] == 32
    assert not any("quant_conv" in k for k in stored)
    assert stored["encoder.mid.attn_1.q.weight"].ndim == 4  # BFL keeps 1x1 convs
    written = ae_state_dict_bfl(load_flux_ae(ae_file))
    assert written.keys() == stored.keys()
    for key, tensor in stored.items():
        assert torch.equal(written[key], tensor), key


@pytest.mark.parametrize("layout", ["first_stage_model.", "vae.", "diffusers_file", "diffusers_folder"])
def test_ae_other_layouts_load_the_same(ae_file, tmp_path, layout):
    expected = load_flux_ae(ae_file).state_dict()
    if layout == "diffusers_folder":
        build_tiny_ae(seed=3).save_pretrained(str(tmp_path / "vae"))
        source = tmp_path / "vae"
    elif layout == "diffusers_file":
        source = tmp_path / "ae_diffusers.safetensors"
        save_file({k: v.contiguous() for k, v in build_tiny_ae(seed=3).state_dict().items()}, str(source))
    else:
        source = write_tiny_ae(tmp_path / "ae.safetensors", seed=3, prefix=layout)
    loaded = load_flux_ae(source).state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_encode_decode_latents_scale_and_shift(ae_file):
    ae = load_flux_ae(ae_file)
    x = _images(2)
    latents = encode_latents(ae, x, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = ae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(latents, (z - AE_SHIFT) * AE_SCALE)
        assert latents.shape == (2, 16, 4, 4) and latents.dtype == torch.float32
        torch.testing.assert_close(decode_latents(ae, latents), ae.decode(z).sample, rtol=1e-5, atol=1e-5)
    bf16 = load_flux_ae(ae_file, dtype=torch.bfloat16, mmap=False)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert encode_latents(bf16, x).dtype == torch.float32 and decode_latents(bf16, latents).dtype == torch.float32


def test_ae_wrong_files(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match="--ae"):
        load_flux_ae(tmp_path / "missing.safetensors")
    t5 = write_tiny_t5(tmp_path / "t5.safetensors", vocab)
    with pytest.raises(CheckpointError, match=r"t5\.safetensors is not an autoencoder.*T5 text encoder"):
        load_flux_ae(t5)
    cases = {
        "lora.safetensors": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)}, "LoRA"),
        "dit.safetensors": ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, "FLUX.1 DiT"),
    }
    for name, (tensors, words) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=f"{name} is not an autoencoder.*{words}"):
            load_flux_ae(tmp_path / name)
    sd_vae = build_tiny_vae(seed=0)
    save_file(vae_diffusers_to_ldm(sd_vae.state_dict(), VAEShape.from_diffusers_config(sd_vae.config)),
              str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(CheckpointError, match="4-channel VAE"):
        load_flux_ae(tmp_path / "sd_vae.safetensors")


# ------------------------------------------------------------------------------------------------
# CLIP-L
# ------------------------------------------------------------------------------------------------

def _clip_reference(dtype: torch.dtype) -> CLIPTextModelWithProjection:
    """The model that wrote the file, with its weights rounded through the file's dtype."""
    model = build_tiny_clip_l(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


@pytest.mark.parametrize("prefix,dtype", [
    ("", torch.float32),
    ("cond_stage_model.transformer.", torch.float32),
    ("text_encoders.clip_l.transformer.", torch.float16),
])
def test_clip_l_file_loads_to_identical_outputs(tmp_path, clip_tokenizer, prefix, dtype):
    path = write_tiny_clip_l(tmp_path / "clip_l.safetensors", seed=1, prefix=prefix, dtype=dtype)
    model = load_clip_l(path, dtype=torch.float32)
    assert type(model) is CLIPTextModel and model.config.hidden_act == "quick_gelu"
    reference = _clip_reference(dtype)
    ids = clip_tokenizer(["a red circle", "two blue squares on a white background"], padding="max_length",
                         max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, ref = model(input_ids=ids), reference.text_model(input_ids=ids)
        torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state)
        torch.testing.assert_close(ours.pooler_output, ref.pooler_output)
        # FLUX's pooled vector: the final-layer-normed state at the (first) EOS token.
        eos = (ids == 49407).int().argmax(dim=1)
        torch.testing.assert_close(ours.pooler_output, ours.last_hidden_state[torch.arange(2), eos])
        projected = load_clip_l(path, with_projection=True)
        torch.testing.assert_close(projected(input_ids=ids).text_embeds, reference(input_ids=ids).text_embeds)


def test_clip_l_folder(tmp_path, clip_tokenizer):
    reference = _clip_reference(torch.float32)
    reference.save_pretrained(str(tmp_path / "clip_folder"))
    ids = clip_tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = load_clip_l(tmp_path / "clip_folder")(input_ids=ids).pooler_output
        torch.testing.assert_close(pooled, reference.text_model(input_ids=ids).pooler_output)


def test_clip_l_half_precision_and_all_in_one_choice(tmp_path):
    clip_l = write_tiny_clip_l(tmp_path / "l.safetensors", seed=1, prefix="text_encoders.clip_l.transformer.")
    clip_g_like = write_tiny_clip_l(tmp_path / "g.safetensors", seed=2, prefix="text_encoders.clip_g.transformer.")
    save_file({**load_file(str(clip_l)), **load_file(str(clip_g_like))}, str(tmp_path / "both.safetensors"))
    model = load_clip_l(tmp_path / "both.safetensors", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    expected = load_clip_l(clip_l, dtype=torch.bfloat16).state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


# ------------------------------------------------------------------------------------------------
# T5
# ------------------------------------------------------------------------------------------------

def _t5_ids(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_t5_file_loads_to_identical_outputs(tmp_path, vocab, file_dtype):
    path = write_tiny_t5(tmp_path / "t5.safetensors", vocab, seed=4, dtype=file_dtype)
    model = load_t5xxl(path, dtype=file_dtype)
    reference = build_tiny_t5(vocab, seed=4).to(file_dtype)
    assert model.config.feed_forward_proj == "gated-gelu" and model.config.num_heads == 2
    assert model.config.d_kv == 16 and model.config.relative_attention_max_distance == 128
    assert model.shared.weight is model.encoder.embed_tokens.weight
    ids, mask = _t5_ids(vocab)
    with torch.no_grad():
        for attention_mask in (None, mask):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=attention_mask).last_hidden_state,
                                       reference(input_ids=ids, attention_mask=attention_mask).last_hidden_state,
                                       rtol=0, atol=0)


def test_t5_prefix_single_embedding_fp16_and_fp8(tmp_path, vocab):
    reference = build_tiny_t5(vocab, seed=4)
    ids, mask = _t5_ids(vocab)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state

    # ComfyUI all-in-one prefix, the embedding stored once (as diffusers' text_encoder_2 saves it).
    state = t5_state_dict(reference, prefix="text_encoders.t5xxl.transformer.")
    del state["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"]
    state["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "aio.safetensors"))
    model = load_t5xxl(tmp_path / "aio.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected, rtol=0,
                                   atol=0)

    # fp16: the feed-forward output projections stay float32, as transformers keeps them.
    half = load_t5xxl(write_tiny_t5(tmp_path / "t5_fp16.safetensors", vocab, seed=4, dtype=torch.float16),
                      dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert half.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    with torch.no_grad():
        out = half(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.isfinite().all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)

    # A transformers folder (save_pretrained) loads too.
    reference.save_pretrained(str(tmp_path / "t5_folder"))
    with torch.no_grad():
        folder = load_t5xxl(tmp_path / "t5_folder")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(folder, expected, rtol=0, atol=0)

    # fp8 e4m3fn, plain and ComfyUI "scaled", upcast to the requested dtype.
    rounded = build_tiny_t5(vocab, seed=4)
    plain = write_tiny_t5(tmp_path / "t5_fp8.safetensors", vocab, seed=4, dtype=torch.float8_e4m3fn)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())
        want = rounded(input_ids=ids, attention_mask=mask).last_hidden_state
        got = load_t5xxl(plain, dtype=torch.float32)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    scaled, truth = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, build_tiny_t5(vocab, seed=4)
    for key, tensor in t5_state_dict(reference).items():
        if key.endswith((".q.weight", ".wo.weight")):
            scale = tensor.abs().max() / 448
            scaled[key] = (tensor / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            scaled[key] = tensor
    truth.load_state_dict({k: (scaled[k].float() * scaled[k[: -len("weight")] + "scale_weight"]
                               if k[: -len("weight")] + "scale_weight" in scaled else scaled[k])
                           for k in truth.state_dict()})
    save_file(scaled, str(tmp_path / "t5_scaled.safetensors"))
    with torch.no_grad():
        got = load_t5xxl(tmp_path / "t5_scaled.safetensors")(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, truth(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)


FULL_T5XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def test_full_size_t5xxl_config_and_lora_names_on_meta():
    with torch.device("meta"):
        real = T5EncoderModel(T5Config(**FULL_T5XXL))
    shape = infer_t5_shape(real.state_dict())
    assert shape == T5Shape(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                            relative_attention_num_buckets=32, gated=True)
    with torch.device("meta"):
        ours = T5EncoderModel(T5Config(**shape.transformers_config()))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    names = set()
    for module_name, module in ours.named_modules():
        if isinstance(module, (T5Attention, T5DenseGatedActDense)):
            for child_name, child in module.named_children():
                if isinstance(child, torch.nn.Linear):
                    names.add("lora_te3_" + f"{module_name}.{child_name}".replace(".", "_"))
    reference = {k.split(".")[0] for k in load_reference("lora_keys.json")["flux_dev_lora_dim8_train_t5xxl"]
                 if k.startswith("lora_te3_")}
    assert names == reference and len(names) == 24 * 7


def test_text_encoder_wrong_files_and_unused_keys(tmp_path, vocab, caplog):
    clip = write_tiny_clip_l(tmp_path / "clip_l.safetensors")
    t5 = write_tiny_t5(tmp_path / "t5xxl.safetensors", vocab)
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors is not a T5 text encoder \(--t5xxl\).*CLIP"):
        load_t5xxl(clip)
    with pytest.raises(CheckpointError, match=r"t5xxl\.safetensors is not a CLIP-L text encoder \(--clip_l\).*T5"):
        load_clip_l(t5)
    ae = write_tiny_ae(tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_t5xxl(ae)
    with pytest.raises(FileNotFoundError, match="--t5xxl"):
        load_t5xxl(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="--clip_l"):
        load_clip_l(tmp_path / "nope.safetensors")
    broken = load_file(str(t5))
    del broken["encoder.block.1.layer.0.layer_norm.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*missing.*block\.1\.layer\.0\.layer_norm"):
        load_t5xxl(tmp_path / "broken.safetensors")

    extra = {**load_file(str(t5)), "encoder.block.0.layer.0.SelfAttention.q_norm.weight": torch.ones(4),
             "decoder.block.0.layer.0.SelfAttention.q.weight": torch.ones(2, 2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with caplog.at_level(logging.INFO, logger="library.families.text_encoder_files"):
        load_t5xxl(tmp_path / "extra.safetensors")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SelfAttention.q_norm.weight" in m for m in warnings) and not any("decoder." in m for m in warnings)
    assert any("decoder.block.0" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


# ------------------------------------------------------------------------------------------------
# T5 tokenizer
# ------------------------------------------------------------------------------------------------

def test_t5_tokenizer_folder_round_trip(tmp_path, t5_tokenizer_dir, t5_tokenizer, vocab):
    import sentencepiece as spm

    folder = t5_tokenizer_dir / "google_t5-v1_1-xxl"
    assert (folder / "spiece.model").read_bytes() == train_tiny_spiece(0)  # deterministic
    assert 300 <= vocab - 100 <= 500  # sentencepiece pieces; the tokenizer adds 100 <extra_id_N>
    processor = spm.SentencePieceProcessor(model_proto=(folder / "spiece.model").read_bytes())
    captions = ["a red circle on a blue background", "A photo of two purple stars, standing in the park."]
    for caption in captions:
        assert t5_tokenizer(caption).input_ids == processor.encode(caption) + [1]
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id) == (0, 1, 2)
    # A tiny T5 for this tokenizer has exactly its vocabulary.
    t5 = load_t5xxl(write_tiny_t5(tmp_path / "t5.safetensors", vocab))
    assert t5.config.vocab_size == len(t5_tokenizer)

    for keep in ("spiece.model", "tokenizer.json"):
        only = tmp_path / keep / "google_t5-v1_1-xxl"
        only.mkdir(parents=True)
        (only / keep).write_bytes((folder / keep).read_bytes())
        tokenizer = load_t5_tokenizer(tmp_path / keep)
        assert [tokenizer(c).input_ids for c in captions] == [t5_tokenizer(c).input_ids for c in captions]


def test_t5_tokenizer_from_the_local_hub_cache(tmp_path, t5_tokenizer_dir, t5_tokenizer, monkeypatch):
    import huggingface_hub.constants

    # The hub cache layout: models--org--name/refs/main -> snapshots/<commit>/<files>.
    repo = tmp_path / "hub" / "models--google--t5-v1_1-xxl"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    source = t5_tokenizer_dir / "google_t5-v1_1-xxl"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).write_bytes((source / name).read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tokenizer = load_t5_tokenizer(tmp_path / "no_such_cache_dir")
    assert tokenizer("a red circle").input_ids == t5_tokenizer("a red circle").input_ids


def test_t5_tokenizer_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_t5_tokenizer(tmp_path, hub_id="nobody/not-a-cached-t5")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nobody_not-a-cached-t5") in message
    assert "copy the tokenizer files of nobody/not-a-cached-t5" in message
    with pytest.raises(FileNotFoundError, match="no --tokenizer_cache_dir"):
        load_t5_tokenizer(None, hub_id="nobody/not-a-cached-t5")
    (tmp_path / "empty" / "google_t5-v1_1-xxl").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="neither tokenizer.json nor spiece.model"):
        load_t5_tokenizer(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# Tokenize and encode
# ------------------------------------------------------------------------------------------------

def test_tokenize_shapes_padding_mask_and_pickling(clip_tokenizer, t5_tokenizer):
    captions = ["a red circle", "two blue squares on a white background " * 20]
    ids = flux_text.tokenize(clip_tokenizer, t5_tokenizer, captions, 32)
    assert ids["clip_ids"].shape == (2, 77) and ids["t5_ids"].shape == (2, 32) and ids["t5_mask"].shape == (2, 32)
    assert ids["clip_ids"][0, 0] == 49406 and ids["clip_ids"][0, -1] == 49407  # BOS, EOS padding
    assert ids["clip_ids"][1, -1] == 49407  # truncated, still ending in EOS
    short = t5_tokenizer(captions[0]).input_ids
    assert ids["t5_ids"][0, : len(short)].tolist() == short and short[-1] == 1
    assert ids["t5_ids"][0, len(short):].eq(0).all() and ids["t5_mask"][0].sum() == len(short)
    assert ids["t5_ids"][1, -1] == 1 and ids["t5_mask"][1].all()  # truncated keeps EOS
    worker_fn = pickle.loads(pickle.dumps(functools.partial(flux_text.tokenize, clip_tokenizer, t5_tokenizer,
                                                            t5_max_length=32)))
    again = worker_fn(captions)
    assert all(torch.equal(again[k], ids[k]) for k in ids)
    assert flux_text.default_t5_max_length(True) == 512 and flux_text.default_t5_max_length(False) == 256


def test_encode_with_and_without_the_t5_mask(tmp_path, clip_tokenizer, t5_tokenizer, vocab):
    clip = load_clip_l(write_tiny_clip_l(tmp_path / "clip_l.safetensors", seed=1))
    t5 = load_t5xxl(write_tiny_t5(tmp_path / "t5.safetensors", vocab, seed=4))
    ids = flux_text.tokenize(clip_tokenizer, t5_tokenizer, ["a red circle", "a photo of a cat in the garden"], 24)
    real = ids["t5_mask"].bool()
    other = dict(ids, t5_ids=torch.where(real, ids["t5_ids"], torch.full_like(ids["t5_ids"], 7)))
    with torch.no_grad():
        cond = flux_text.encode(clip, t5, ids, apply_t5_attn_mask=True)
        assert cond.l_pooled.shape == (2, 32) and cond.t5_out.shape == (2, 24, 32)
        assert cond.t5_attn_mask.dtype == torch.bool and torch.equal(cond.t5_attn_mask, real)
        torch.testing.assert_close(cond.l_pooled, clip(input_ids=ids["clip_ids"]).pooler_output)
        masked_other = flux_text.encode(clip, t5, other, apply_t5_attn_mask=True)
        torch.testing.assert_close(cond.t5_out[real], masked_other.t5_out[real], rtol=1e-5, atol=1e-6)

        plain = flux_text.encode(clip, t5, ids, apply_t5_attn_mask=False)
        torch.testing.assert_close(plain.t5_out, t5(input_ids=ids["t5_ids"]).last_hidden_state)
        plain_other = flux_text.encode(clip, t5, other, apply_t5_attn_mask=False)
        assert not torch.allclose(plain.t5_out[real], plain_other.t5_out[real])  # T5 attends to padding

        no_clip = flux_text.encode(None, t5, {k: v for k, v in ids.items() if k != "clip_ids"},
                                   apply_t5_attn_mask=True)
    assert no_clip.l_pooled.shape == (2, 768) and not no_clip.l_pooled.any()
    moved = cond.to("cpu", torch.bfloat16)
    assert moved.t5_out.dtype == torch.bfloat16 and moved.l_pooled.dtype == torch.bfloat16
    assert moved.t5_attn_mask.dtype == torch.bool
