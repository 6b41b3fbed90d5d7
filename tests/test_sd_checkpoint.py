"""SD1/SD2 checkpoints: parity with diffusers' own converters, exact write-back, the full-size
layouts on the meta device, Diffusers folders, VAE replacement and the errors users see."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.families.sd import checkpoint as ckpt
from library.families.sd.checkpoint import CheckpointError, TextEncoderShape, UNetShape, VAEShape
from library.families.sd.loading import load_sd_models, load_vae
from library.demo.tiny_sd import (
    build_tiny_sd,
    build_tiny_vae,
    tiny_text_config,
    tiny_unet_config,
    tiny_vae_config,
    write_tiny_sd_checkpoint,
)
from tests.reference import load_reference

REFERENCE_KEYS = load_reference("checkpoint_keys.json")
SD15_KEYS: dict[str, list[int]] = REFERENCE_KEYS["sd15_single_file_keys"]

# Single-file tensors that no model parameter holds and that the loader keeps as extras. The
# reference SD1.5 file is pruned, so it has none; the tiny files below add these on purpose.
SD15_EXPECTED_EXTRAS: set[str] = set()
TINY_EXTRAS = {
    "alphas_cumprod": torch.linspace(0.999, 0.005, 1000),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
}
SD1_POSITION_IDS = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}


@pytest.fixture(scope="module")
def sd1(tiny_sd1_ckpt):
    return load_sd_models(tiny_sd1_ckpt, v2=False)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_ckpt):
    return load_sd_models(tiny_sd2_ckpt, v2=True)


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, 32, generator=g))


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(seed))


def without_text_model(state_dict: dict, model: torch.nn.Module) -> dict:
    # diffusers' converters emit transformers-4 names; transformers 5 dropped the text_model level.
    if hasattr(model, "text_model"):
        return state_dict
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


# --- parity with diffusers' converters ---------------------------------------------------------

@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@torch.no_grad()
def test_unet_matches_diffusers_converter(v2, request):
    path = request.getfixturevalue("tiny_sd2_ckpt" if v2 else "tiny_sd1_ckpt")
    ours = request.getfixturevalue("sd2" if v2 else "sd1").unet
    ldm = load_file(str(path))
    # diffusers builds SD2 with Linear projections; ours always uses 1x1 convs.
    config = {**tiny_unet_config(v2), "use_linear_projection": v2}
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(ldm, config), strict=True)
    assert isinstance(ours.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    sample, t, context = unet_inputs()
    expected = reference(sample, t, context).sample
    torch.testing.assert_close(ours(sample, t, context).sample, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().mean() > 0.1  # a real output, not a degenerate zero


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@torch.no_grad()
def test_vae_matches_diffusers_converter(v2, request):
    path = request.getfixturevalue("tiny_sd2_ckpt" if v2 else "tiny_sd1_ckpt")
    ours = request.getfixturevalue("sd2" if v2 else "sd1").vae
    reference = AutoencoderKL(**tiny_vae_config()).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(path)), tiny_vae_config()), strict=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours_dist, ref_dist = ours.encode(image).latent_dist, reference.encode(image).latent_dist
    assert ours_dist.mean.shape == (1, 4, 4, 4)  # latent stride 8
    torch.testing.assert_close(ours_dist.mean, ref_dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_dist.logvar, ref_dist.logvar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(ref_dist.mean).sample, reference.decode(ref_dist.mean).sample,
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sd1_text_encoder_matches_diffusers_converter(tiny_sd1_ckpt, sd1):
    reference = CLIPTextModel(tiny_text_config(False)).eval()
    converted = without_text_model(convert_ldm_clip_checkpoint(load_file(str(tiny_sd1_ckpt))), reference)
    reference.load_state_dict(converted, strict=True)
    ids = token_ids()
    ours = sd1.text_encoder(ids, output_hidden_states=True)
    expected = reference(ids, output_hidden_states=True)
    assert sd1.text_encoder.config.hidden_act == "quick_gelu"
    assert len(ours.hidden_states) == len(expected.hidden_states) == 4
    for a, b in zip(ours.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.last_hidden_state, expected.last_hidden_state, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_sd2_text_encoder_matches_diffusers_converter(tiny_sd2_ckpt, sd2):
    ldm = load_file(str(tiny_sd2_ckpt))
    reference = CLIPTextModel(tiny_text_config(True)).eval()
    converted = without_text_model(convert_open_clip_checkpoint(reference, ldm), reference)
    result = reference.load_state_dict(converted, strict=False)
    assert result.missing_keys == []
    # diffusers hard-codes resblocks.23 as the block to drop, so at tiny size it hands over block 2,
    # which the 2-layer model has no place for.
    assert result.unexpected_keys and all(k.startswith("encoder.layers.2.") for k in result.unexpected_keys)
    assert sd2.text_encoder.config.num_hidden_layers == 2  # the file holds 3 blocks
    assert sd2.text_encoder.config.hidden_act == "gelu"
    ids = token_ids()
    torch.testing.assert_close(sd2.text_encoder(ids).last_hidden_state, reference(ids).last_hidden_state,
                               rtol=1e-6, atol=1e-6)


def test_loaded_models_use_sdpa(sd1):
    assert all(isinstance(p, AttnProcessor2_0) for p in sd1.unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in sd1.vae.attn_processors.values())


# --- write-back ------------------------------------------------------------------------------

@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_mapping_round_trip_is_exact(v2):
    ldm = build_tiny_sd(v2).ldm
    unet_shape, vae_shape = ckpt.infer_unet_shape(ldm), ckpt.infer_vae_shape(ldm)
    te_shape = ckpt.infer_text_encoder_shape(ldm)
    unet = ckpt.unet_ldm_to_diffusers(ldm, unet_shape)
    vae = ckpt.vae_ldm_to_diffusers(ldm, vae_shape)
    te = ckpt.text_encoder_ldm_to_diffusers(ldm, te_shape, hf_prefix="text_model.")  # transformers-4 names
    kept = {k: ldm[k] for k in te.unused}
    back = {**ckpt.unet_diffusers_to_ldm(unet.state_dict, unet_shape),
            **ckpt.vae_diffusers_to_ldm(vae.state_dict, vae_shape),
            **ckpt.text_encoder_diffusers_to_ldm(te.state_dict, te_shape, kept=kept)}
    assert set(back) == set(ldm)
    for key, tensor in ldm.items():
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    assert unet.unused == vae.unused == ()
    if v2:
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)  # Linear in the file
        assert unet.state_dict["down_blocks.0.attentions.0.proj_in.weight"].shape == (32, 32, 1, 1)
        assert set(te.unused) == {k for k in ldm if ".resblocks.2." in k} | {
            "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    else:
        assert te.unused == ()


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_loaded_model_writes_the_same_file_back(tmp_path, v2):
    extras = {**TINY_EXTRAS, **({} if v2 else SD1_POSITION_IDS)}
    path = write_tiny_sd_checkpoint(tmp_path / "m.safetensors", v2=v2, extra=extras)
    original = load_file(str(path))
    models = load_sd_models(path, v2=v2)
    assert set(extras) <= set(models.ldm_extras)
    back = models.ldm_state_dict()
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


@torch.no_grad()
def test_ckpt_and_half_precision_files_load(tmp_path, sd1):
    ids = token_ids()
    sample, t, context = unet_inputs()
    expected = sd1.unet(sample, t, context).sample
    from_ckpt = load_sd_models(write_tiny_sd_checkpoint(tmp_path / "m.ckpt", fmt="ckpt"), v2=False)
    torch.testing.assert_close(from_ckpt.unet(sample, t, context).sample, expected, rtol=0, atol=0)
    half = load_sd_models(write_tiny_sd_checkpoint(tmp_path / "h.safetensors", dtype=torch.float16), v2=False)
    assert half.unet.dtype == torch.float32  # cast to the requested dtype
    torch.testing.assert_close(half.unet(sample, t, context).sample, expected, rtol=2e-2, atol=2e-2)
    bf16 = load_sd_models(tmp_path / "m.ckpt", v2=False, dtype=torch.bfloat16)
    assert bf16.unet.dtype == bf16.vae.dtype == bf16.text_encoder.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.text_encoder(ids).last_hidden_state.float(),
                               sd1.text_encoder(ids).last_hidden_state, rtol=5e-2, atol=5e-2)


def test_ckpt_with_pickled_objects_loads_with_a_warning(tmp_path, caplog, sd1):
    import argparse

    ldm = load_file(str(write_tiny_sd_checkpoint(tmp_path / "m.safetensors")))
    # Original training checkpoints pickle Python objects (hyper-parameters, callbacks) beside the weights.
    torch.save({"state_dict": ldm, "hyper_parameters": argparse.Namespace(lr=1e-4)}, str(tmp_path / "old.ckpt"))
    with caplog.at_level("WARNING"):
        models = load_sd_models(tmp_path / "old.ckpt", v2=False)
    assert "holds pickled Python objects" in caplog.text
    assert set(models.ldm_state_dict()) == set(ldm)


# --- full size on the meta device ------------------------------------------------------------

def meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def shapes_of(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_sd15_full_size_layout_on_meta():
    reference = meta_state_dict(SD15_KEYS)
    unet_shape, vae_shape = ckpt.infer_unet_shape(reference), ckpt.infer_vae_shape(reference)
    te_shape = ckpt.infer_text_encoder_shape(reference)
    unet_config = unet_shape.diffusers_config(v2=False)
    assert unet_config["block_out_channels"] == (320, 640, 1280, 1280)
    assert unet_config["layers_per_block"] == 2
    assert unet_config["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet_config["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet_config["cross_attention_dim"] == 768 and unet_config["attention_head_dim"] == 8
    assert unet_config["transformer_layers_per_block"] == 1 and "time_embedding_dim" not in unet_config
    assert (unet_config["in_channels"], unet_config["out_channels"]) == (4, 4)
    assert unet_shape.time_embed_dim == 1280 and not unet_shape.stored_linear_projection
    assert vae_shape == VAEShape(in_channels=3, out_channels=3, latent_channels=4,
                                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, mid_attention=True,
                                 use_quant_conv=True, use_post_quant_conv=True, attention_weight_ndim=4)
    assert te_shape.transformers_config() == {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_shape.diffusers_config())
        te = CLIPTextModel(CLIPTextConfig(**te_shape.transformers_config()))
    prefix = ckpt.transformers_text_prefix(te)
    unet_c = ckpt.unet_ldm_to_diffusers(reference, unet_shape)
    vae_c = ckpt.vae_ldm_to_diffusers(reference, vae_shape)
    te_c = ckpt.text_encoder_ldm_to_diffusers(reference, te_shape, hf_prefix=prefix)
    assert shapes_of(unet_c.state_dict) == shapes_of(unet.state_dict())
    assert shapes_of(vae_c.state_dict) == shapes_of(vae.state_dict())
    assert shapes_of(te_c.state_dict) == shapes_of(te.state_dict())
    extras = set(reference) - unet_c.used - vae_c.used - te_c.used
    assert extras == SD15_EXPECTED_EXTRAS

    back = {**ckpt.unet_diffusers_to_ldm(unet.state_dict(), unet_shape),
            **ckpt.vae_diffusers_to_ldm(vae.state_dict(), vae_shape),
            **ckpt.text_encoder_diffusers_to_ldm(te.state_dict(), te_shape)}
    assert shapes_of(back) == {k: tuple(v) for k, v in SD15_KEYS.items() if k not in SD15_EXPECTED_EXTRAS}


def sd2_expected_text_encoder_keys() -> dict[str, tuple[int, ...]]:
    """The OpenCLIP ViT-H/14 text tower of an SD2 single file (24 blocks, width 1024)."""
    p = "cond_stage_model.model."
    keys = {p + "positional_embedding": (77, 1024), p + "token_embedding.weight": (49408, 1024),
            p + "ln_final.weight": (1024,), p + "ln_final.bias": (1024,), p + "text_projection": (1024, 1024),
            p + "logit_scale": ()}
    for i in range(24):
        b = f"{p}transformer.resblocks.{i}."
        keys.update({b + "ln_1.weight": (1024,), b + "ln_1.bias": (1024,), b + "ln_2.weight": (1024,),
                     b + "ln_2.bias": (1024,), b + "attn.in_proj_weight": (3072, 1024),
                     b + "attn.in_proj_bias": (3072,),
                     b + "attn.out_proj.weight": (1024, 1024), b + "attn.out_proj.bias": (1024,),
                     b + "mlp.c_fc.weight": (4096, 1024), b + "mlp.c_fc.bias": (4096,),
                     b + "mlp.c_proj.weight": (1024, 4096), b + "mlp.c_proj.bias": (1024,)})
    return keys


def test_sd2_full_size_layout_on_meta():
    unet_config = {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                   "use_linear_projection": False}
    te_config = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                               num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
    vae_config = ckpt.infer_vae_shape(meta_state_dict(SD15_KEYS)).diffusers_config()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        te = CLIPTextModel(te_config)
    unet_shape = UNetShape.from_diffusers_config(unet.config, stored_linear_projection=True)
    vae_shape = VAEShape.from_diffusers_config(vae.config)
    te_shape = TextEncoderShape.from_transformers_config(te.config)
    assert te_shape.kind == "openclip"
    ldm = {**ckpt.unet_diffusers_to_ldm(unet.state_dict(), unet_shape),
           **ckpt.vae_diffusers_to_ldm(vae.state_dict(), vae_shape),
           **ckpt.text_encoder_diffusers_to_ldm(te.state_dict(), te_shape)}

    # The SD2 U-Net and VAE have the SD1.5 key names; the U-Net differs only in the cross-attention
    # input width and in storing proj_in/proj_out as Linear.
    expected = {}
    for key, shape in SD15_KEYS.items():
        if key.startswith("cond_stage_model."):
            continue
        shape = tuple(shape)
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            shape = (shape[0], 1024)
        elif key.endswith((".proj_in.weight", ".proj_out.weight")) and key.startswith("model."):
            shape = shape[:2]
        expected[key] = shape
    expected.update(sd2_expected_text_encoder_keys())
    assert shapes_of(ldm) == expected

    # ... and reading that layout back gives the same architecture and tensors.
    assert ckpt.infer_unet_shape(ldm) == unet_shape
    assert ckpt.infer_vae_shape(ldm) == vae_shape
    assert ckpt.infer_text_encoder_shape(ldm) == te_shape
    assert unet_shape.diffusers_config(v2=True)["attention_head_dim"] == (5, 10, 20, 20)
    te_c = ckpt.text_encoder_ldm_to_diffusers(ldm, te_shape, hf_prefix=ckpt.transformers_text_prefix(te))
    assert shapes_of(ckpt.unet_ldm_to_diffusers(ldm, unet_shape).state_dict) == shapes_of(unet.state_dict())
    assert shapes_of(ckpt.vae_ldm_to_diffusers(ldm, vae_shape).state_dict) == shapes_of(vae.state_dict())
    assert shapes_of(te_c.state_dict) == shapes_of(te.state_dict())
    assert set(te_c.unused) == set(ckpt.placeholder_openclip_keys(te_shape))


# --- Diffusers folders and VAE replacement ---------------------------------------------------

@torch.no_grad()
def assert_same_outputs(a, b, tol: float = 1e-6):
    sample, t, context = unet_inputs()
    torch.testing.assert_close(a.unet(sample, t, context).sample, b.unet(sample, t, context).sample, rtol=tol, atol=tol)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.testing.assert_close(a.vae.encode(image).latent_dist.mean, b.vae.encode(image).latent_dist.mean,
                               rtol=tol, atol=tol)
    ids = token_ids()
    torch.testing.assert_close(a.text_encoder(ids).last_hidden_state, b.text_encoder(ids).last_hidden_state,
                               rtol=tol, atol=tol)


def test_diffusers_folder_loads_like_the_single_file(tiny_sd1_diffusers, sd1):
    folder = load_sd_models(tiny_sd1_diffusers, v2=False)
    assert_same_outputs(folder, sd1)
    assert folder.tokenizer("a cat").input_ids == sd1.tokenizer("a cat").input_ids
    assert set(folder.ldm_state_dict()) == set(sd1.ldm_state_dict())


def test_sd2_diffusers_folder_gets_conv_projections(tiny_sd2_diffusers, sd2, tiny_sd2_ckpt):
    assert json.loads((tiny_sd2_diffusers / "unet" / "config.json").read_text())["use_linear_projection"]
    folder = load_sd_models(tiny_sd2_diffusers, v2=True)
    assert isinstance(folder.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert folder.unet_shape.stored_linear_projection
    assert folder.tokenizer.pad_token_id == 0
    assert_same_outputs(folder, sd2, tol=1e-5)
    # Written as a single file, the model has every key of a real one; what the Diffusers folder
    # lacks (last OpenCLIP block, text_projection, logit_scale) is filled with placeholders.
    original = load_file(str(tiny_sd2_ckpt))
    back = folder.ldm_state_dict()
    assert shapes_of(back) == shapes_of(original)
    assert back["cond_stage_model.model.logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert torch.equal(back["model.diffusion_model.input_blocks.1.1.proj_in.weight"],
                       original["model.diffusion_model.input_blocks.1.1.proj_in.weight"])


@pytest.mark.parametrize("layout", ["ldm", "ldm_prefixed", "diffusers", "diffusers_folder", "full_checkpoint"])
@torch.no_grad()
def test_vae_path_replaces_the_vae(tmp_path, tiny_sd1_ckpt, layout):
    replacement = build_tiny_vae(seed=99)
    shape = VAEShape.from_diffusers_config(replacement.config)
    if layout == "diffusers_folder":
        replacement.save_pretrained(str(tmp_path / "vae"))
        vae_path = tmp_path / "vae"
    elif layout == "full_checkpoint":
        vae_path = tmp_path / "full.safetensors"
        ldm = load_file(str(tiny_sd1_ckpt))
        ldm.update(ckpt.vae_diffusers_to_ldm(replacement.state_dict(), shape))
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(vae_path))
    else:
        vae_path = tmp_path / "vae.safetensors"
        if layout == "diffusers":
            tensors = replacement.state_dict()
        else:
            tensors = ckpt.vae_diffusers_to_ldm(replacement.state_dict(), shape,
                                                prefix="first_stage_model." if layout == "ldm_prefixed" else "")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(vae_path))
    models = load_sd_models(tiny_sd1_ckpt, v2=False, vae_path=vae_path)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.testing.assert_close(models.vae.encode(image).latent_dist.mean,
                               replacement.encode(image).latent_dist.mean, rtol=1e-6, atol=1e-6)
    assert not any(k.startswith("first_stage_model.") for k in models.ldm_extras)


# --- errors ----------------------------------------------------------------------------------

def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found: .*nope.safetensors"):
        load_sd_models(tmp_path / "nope.safetensors", v2=False)
    with pytest.raises(FileNotFoundError, match="VAE not found"):
        load_vae(tmp_path / "nope_vae.safetensors")


def test_v2_flag_mismatch_says_which_flag(tiny_sd1_ckpt, tiny_sd2_ckpt, tiny_sd1_diffusers):
    with pytest.raises(CheckpointError, match=r"tiny_sd1\.safetensors is an SD1 model .*remove --v2"):
        load_sd_models(tiny_sd1_ckpt, v2=True)
    with pytest.raises(CheckpointError, match=r"tiny_sd2\.safetensors is an SD2 model .*add --v2"):
        load_sd_models(tiny_sd2_ckpt, v2=False)
    with pytest.raises(CheckpointError, match="remove --v2"):
        load_sd_models(tiny_sd1_diffusers, v2=True)


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [8, 4],
      "model.diffusion_model.label_emb.0.0.weight": [4, 4]}, "is an SDXL checkpoint .*sdxl_train_network.py"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [8, 320, 1, 1],
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": []}, "is a LoRA/network file.*--network_weights"),
    ({"double_blocks.0.img_attn.qkv.weight": [6, 2]}, "is a FLUX.1 checkpoint"),
    ({"first_stage_model.encoder.down.0.block.0.conv1.weight": [4, 4, 3, 3]}, "holds only a VAE: give it with --vae"),
    ({"foo.bar": [2]}, "is not an SD1/SD2 checkpoint: no 'model.diffusion_model.\\*' keys"),
], ids=["sdxl", "lora", "flux", "vae_only", "unknown"])
def test_wrong_file_type_is_a_clear_error(tmp_path, keys, message):
    path = write(tmp_path / "wrong.safetensors", {k: torch.zeros(v) for k, v in keys.items()})
    with pytest.raises(CheckpointError, match=message):
        load_sd_models(path, v2=False)


def test_damaged_files_are_clear_errors(tmp_path, tiny_sd1_ckpt):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_sd1_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        load_sd_models(truncated, v2=False)
    ldm = load_file(str(tiny_sd1_ckpt))
    del ldm["model.diffusion_model.out.2.weight"]
    with pytest.raises(CheckpointError, match="key 'model.diffusion_model.out.2.weight' is missing"):
        load_sd_models(write(tmp_path / "incomplete.safetensors", ldm), v2=False)
    not_a_folder = tmp_path / "folder"
    not_a_folder.mkdir()
    with pytest.raises(CheckpointError, match="not a Diffusers SD model: missing unet/config.json"):
        load_sd_models(not_a_folder, v2=False)
