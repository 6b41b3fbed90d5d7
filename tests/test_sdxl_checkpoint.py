"""SDXL single files and Diffusers folders: parity with diffusers' own converters, exact write-back,
the full-size SAI layout on the meta device, and the errors users see."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.demo.tiny_sd import write_tiny_sd_checkpoint
from library.demo.tiny_sdxl import (
    build_tiny_sdxl,
    tiny_sdxl_unet_config,
    tiny_te1_config,
    tiny_te2_config,
    write_tiny_sdxl_checkpoint,
)
from library.families.sd import checkpoint as ckpt
from library.families.sd.checkpoint import CheckpointError
from library.families.sd.loading import load_sd_models
from library.families.sdxl import checkpoint as xl
from library.families.sdxl.loading import load_sdxl_models
from tests.reference import load_reference

SDXL_KEYS: dict[str, list[int]] = load_reference("checkpoint_keys.json")["sdxl_single_file_keys"]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_ckpt):
    return load_sdxl_models(tiny_sdxl_ckpt)


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[1024.0, 768, 0, 32, 64, 64], [512, 512, 16, 0, 64, 64]])}
    return sample, torch.tensor([10, 700]), context, added


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(seed))


def without_text_model(state_dict: dict, model: torch.nn.Module) -> dict:
    if hasattr(model, "text_model"):
        return state_dict
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


# --- parity with diffusers' converters ---------------------------------------------------------

@torch.no_grad()
def test_unet_matches_diffusers_converter(tiny_sdxl_ckpt, sdxl):
    config = tiny_sdxl_unet_config()
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(load_file(str(tiny_sdxl_ckpt)), config), strict=True)
    assert isinstance(sdxl.unet.down_blocks[1].attentions[0].proj_in, torch.nn.Linear)  # SDXL keeps Linear
    assert sdxl.unet.config.addition_embed_type == "text_time"
    sample, t, context, added = unet_inputs()
    expected = reference(sample, t, context, added_cond_kwargs=added).sample
    torch.testing.assert_close(sdxl.unet(sample, t, context, added_cond_kwargs=added).sample, expected,
                               rtol=1e-5, atol=1e-5)
    assert expected.abs().mean() > 0.1
    # The size ids are really used: other ids, another output.
    other = {**added, "time_ids": added["time_ids"].flip(0)}
    assert not torch.allclose(sdxl.unet(sample, t, context, added_cond_kwargs=other).sample, expected, atol=1e-3)


@torch.no_grad()
def test_text_encoder1_matches_diffusers_converter(tiny_sdxl_ckpt, sdxl):
    reference = CLIPTextModel(tiny_te1_config()).eval()
    converted = convert_ldm_clip_checkpoint(load_file(str(tiny_sdxl_ckpt)),
                                            remove_prefix="conditioner.embedders.0.transformer.")
    reference.load_state_dict(without_text_model(converted, reference), strict=True)
    ids = token_ids()
    ours, expected = sdxl.text_encoder1(ids, output_hidden_states=True), reference(ids, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_text_encoder2_matches_diffusers_converter(tiny_sdxl_ckpt, sdxl):
    ldm = load_file(str(tiny_sdxl_ckpt))
    reference = CLIPTextModelWithProjection(tiny_te2_config()).eval()
    converted = convert_open_clip_checkpoint(reference, ldm, prefix="conditioner.embedders.1.model.")
    reference.load_state_dict(without_text_model(converted, reference), strict=True)
    assert sdxl.text_encoder2.config.num_hidden_layers == 3  # every stored block is kept
    ids = token_ids()
    ids[:, 10] = 49407  # an EOS so the projected pooled output is defined the same way for both
    ours, expected = sdxl.text_encoder2(ids, output_hidden_states=True), reference(ids, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.text_embeds, expected.text_embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sdxl.text_encoder2.text_projection.weight,
                               ldm["conditioner.embedders.1.model.text_projection"].t())


# --- write-back ------------------------------------------------------------------------------

def test_loaded_model_writes_the_same_file_back(tiny_sdxl_ckpt, sdxl):
    original = load_file(str(tiny_sdxl_ckpt))
    assert set(sdxl.ldm_extras) == {"conditioner.embedders.1.model.logit_scale"}
    back = sdxl.ldm_state_dict()
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_diffusers_folder_loads_the_same_models(tiny_sdxl_diffusers, sdxl):
    folder = load_sdxl_models(tiny_sdxl_diffusers)
    assert folder.tokenizer2.pad_token_id == 0 and folder.tokenizer1.pad_token_id == 49407
    ours, theirs = folder.ldm_state_dict(), sdxl.ldm_state_dict()
    assert set(ours) == set(theirs)
    # A Diffusers folder has no logit_scale: it is written with CLIP's initial value.
    assert ours.pop("conditioner.embedders.1.model.logit_scale") == pytest.approx(math.log(1 / 0.07))
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


@torch.no_grad()
def test_half_precision_ckpt_and_no_mmap_files_load(tmp_path, sdxl):
    sample, t, context, added = unet_inputs()
    expected = sdxl.unet(sample, t, context, added_cond_kwargs=added).sample
    from_ckpt = load_sdxl_models(write_tiny_sdxl_checkpoint(tmp_path / "m.ckpt", fmt="ckpt"))
    torch.testing.assert_close(from_ckpt.unet(sample, t, context, added_cond_kwargs=added).sample, expected,
                               rtol=0, atol=0)
    half = write_tiny_sdxl_checkpoint(tmp_path / "h.safetensors", dtype=torch.float16)
    for mmap in (True, False):
        models = load_sdxl_models(half, mmap=mmap)
        assert models.unet.dtype == torch.float32
        torch.testing.assert_close(models.unet(sample, t, context, added_cond_kwargs=added).sample, expected,
                                   rtol=2e-2, atol=2e-2)
    bf16 = load_sdxl_models(tmp_path / "m.ckpt", dtype=torch.bfloat16)
    assert {bf16.unet.dtype, bf16.vae.dtype, bf16.text_encoder1.dtype, bf16.text_encoder2.dtype} == {torch.bfloat16}


def test_vae_override(tmp_path, tiny_sd1_ckpt, sdxl, tiny_sdxl_ckpt):
    # An SD VAE file (full SD1 checkpoint here) replaces the SDXL file's own VAE.
    models = load_sdxl_models(tiny_sdxl_ckpt, vae_path=tiny_sd1_ckpt)
    replacement = load_sd_models(tiny_sd1_ckpt, v2=False).vae.state_dict()
    assert all(torch.equal(v, replacement[k]) for k, v in models.vae.state_dict().items())


# --- errors -----------------------------------------------------------------------------------

def test_errors_name_the_right_script(tmp_path, tiny_sd1_ckpt, tiny_sdxl_ckpt, tiny_sd1_diffusers):
    with pytest.raises(CheckpointError, match="SD1/SD2 checkpoint .*train_network.py"):
        load_sdxl_models(tiny_sd1_ckpt)
    with pytest.raises(CheckpointError, match="SDXL checkpoint .*sdxl_train_network.py"):
        load_sd_models(tiny_sdxl_ckpt, v2=False)
    with pytest.raises(CheckpointError, match="text_encoder_2/config.json .*train_network.py"):
        load_sdxl_models(tiny_sd1_diffusers)
    ldm = load_file(str(tiny_sdxl_ckpt))
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in ldm.items()
               if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(CheckpointError, match="refiner"):
        load_sdxl_models(tmp_path / "refiner.safetensors")
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 4)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="--network_weights"):
        load_sdxl_models(tmp_path / "lora.safetensors")
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "novae.safetensors"))
    with pytest.raises(CheckpointError, match="--vae"):
        load_sdxl_models(tmp_path / "novae.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_sdxl_models(tmp_path / "missing.safetensors")


def test_sd_loader_still_rejects_a_unet_only_sdxl_file(tmp_path, tiny_sdxl_ckpt):
    ldm = load_file(str(tiny_sdxl_ckpt))
    sd1 = load_file(str(write_tiny_sd_checkpoint(tmp_path / "sd1.safetensors")))
    mixed = {**{k: v for k, v in sd1.items() if not k.startswith("model.diffusion_model.")},
             **{k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL U-Net"):
        load_sd_models(tmp_path / "mixed.safetensors", v2=False)


# --- full size on the meta device ------------------------------------------------------------

def test_full_size_sai_layout_on_meta():
    """The real SDXL base file: shapes read from its keys give models whose weights map back to
    exactly its keys and shapes (U-Net, both text encoders, VAE)."""
    reference = {k: torch.empty(v, device="meta") for k, v in SDXL_KEYS.items()}
    unet_shape = ckpt.infer_unet_shape(reference)
    shape1, shape2 = xl.te1_shape(reference), xl.te2_shape(reference)
    vae_shape = ckpt.infer_vae_shape(reference)
    assert unet_shape.transformer_depth == (0, 2, 10) and unet_shape.adm_in_channels == 2816
    assert unet_shape.block_out_channels == (320, 640, 1280) and unet_shape.cross_attention_dim == 2048
    assert (shape1.num_layers, shape1.hidden_size) == (12, 768)
    assert (shape2.num_layers, shape2.hidden_size, shape2.intermediate_size) == (32, 1280, 5120)
    assert xl.te2_projection_dim(reference) == 1280
    config = unet_shape.diffusers_config()
    assert config["attention_head_dim"] == (5, 10, 20) and config["use_linear_projection"]
    assert config["projection_class_embeddings_input_dim"] == 2816

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        vae = AutoencoderKL(**vae_shape.diffusers_config())
        te1 = CLIPTextModel(CLIPTextConfig(**shape1.transformers_config()))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**xl.te2_transformers_config(shape2, 1280)))
    assert te2.config.num_attention_heads == 20
    converted = [ckpt.unet_ldm_to_diffusers(reference, unet_shape), ckpt.vae_ldm_to_diffusers(reference, vae_shape),
                 xl.te1_ldm_to_transformers(reference, shape1, hf_prefix=ckpt.transformers_text_prefix(te1)),
                 xl.te2_ldm_to_transformers(reference, shape2, hf_prefix=ckpt.transformers_text_prefix(te2))]
    for c, model in zip(converted, (unet, vae, te1, te2)):
        assert {k: tuple(v.shape) for k, v in c.state_dict.items()} == \
            {k: tuple(v.shape) for k, v in model.state_dict().items()}
    used = set().union(*(c.used for c in converted))
    assert set(reference) - used == {"conditioner.embedders.1.model.logit_scale"}

    back = {**ckpt.unet_diffusers_to_ldm(unet.state_dict(), unet_shape),
            **ckpt.vae_diffusers_to_ldm(vae.state_dict(), vae_shape),
            **xl.te1_transformers_to_ldm(te1.state_dict(), shape1),
            **xl.te2_transformers_to_ldm(te2.state_dict(), shape2)}
    assert {k: list(v.shape) for k, v in back.items()} == SDXL_KEYS


def test_tiny_model_has_the_sai_key_patterns():
    """Every key of the tiny file follows a pattern of the real file (numbers aside)."""
    import re

    def pattern(key: str) -> str:
        return re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", key))

    real = {pattern(k) for k in SDXL_KEYS}
    tiny = {pattern(k) for k in build_tiny_sdxl().ldm}
    assert tiny <= real, sorted(tiny - real)[:5]
