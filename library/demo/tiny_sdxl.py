"""A tiny SDXL base model in the real file layouts (SAI single file, Diffusers folder).

The real structure at a fraction of the width: a U-Net whose first level has no attention and whose
second has two transformer blocks per attention (as SDXL's levels have none, 2 and 10), the
``label_emb`` size/pooled-text embedding (diffusers ``add_embedding``), Linear ``proj_in``/``proj_out``;
text encoder 1 CLIP-L-like (quick-GELU), text encoder 2 OpenCLIP-bigG-like (GELU, ``text_projection``,
``logit_scale``), both with the real 49408-token vocabulary so the real tokenizers work; SD's tiny VAE.

Single files are written through our own maps; the parity tests check them against diffusers'
converters, so a mapping error cannot hide behind a matching inverse.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.demo.tiny_sd import build_tiny_vae, randomize_, write_single_file
from library.families.sd.checkpoint import TextEncoderShape, UNetShape, VAEShape, unet_diffusers_to_ldm, vae_diffusers_to_ldm
from library.families.sd.tokenizer import build_clip_tokenizer
from library.families.sdxl.checkpoint import TE1_PREFIX, TE2_PREFIX, te1_transformers_to_ldm, te2_transformers_to_ldm

TE1_WIDTH = 32
TE2_WIDTH = 32
PROJECTION_DIM = 32
TIME_EMBED_DIM = 8  # per size/crop value; SDXL's is 256
TEXT_LAYERS = 3


def tiny_sdxl_unet_config() -> dict:
    return {"sample_size": 64, "in_channels": 4, "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (32, 64), "layers_per_block": 1, "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": TE1_WIDTH + TE2_WIDTH, "attention_head_dim": (1, 1),
            "use_linear_projection": True, "norm_num_groups": 32,
            "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": PROJECTION_DIM + 6 * TIME_EMBED_DIM}


def tiny_te1_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=TE1_WIDTH, intermediate_size=3 * TE1_WIDTH,
                          num_hidden_layers=TEXT_LAYERS, num_attention_heads=1, max_position_embeddings=77,
                          hidden_act="quick_gelu")


def tiny_te2_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=TE2_WIDTH, intermediate_size=4 * TE2_WIDTH,
                          num_hidden_layers=TEXT_LAYERS, num_attention_heads=1, max_position_embeddings=77,
                          hidden_act="gelu", projection_dim=PROJECTION_DIM, pad_token_id=0)


@dataclass
class TinySDXL:
    """Tiny SDXL models and their single-file (SAI layout) state dict ``ldm``."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder1: CLIPTextModel
    text_encoder2: CLIPTextModelWithProjection
    ldm: dict[str, torch.Tensor]


def te_shapes(te1: CLIPTextModel, te2: CLIPTextModelWithProjection) -> tuple[TextEncoderShape, TextEncoderShape]:
    """The single-file shapes of SDXL text encoders built from transformers configs."""
    from dataclasses import replace

    shape1 = replace(TextEncoderShape.from_transformers_config(te1.config, "clip_l"), ldm_prefix=TE1_PREFIX)
    shape2 = replace(TextEncoderShape.from_transformers_config(te2.config, "openclip"), ldm_prefix=TE2_PREFIX,
                     runs_all_blocks=True)
    return shape1, shape2


def build_tiny_sdxl(seed: int = 0) -> TinySDXL:
    """Deterministic tiny SDXL models and their single-file state dict."""
    unet = randomize_(UNet2DConditionModel(**tiny_sdxl_unet_config()), seed)
    vae = build_tiny_vae(seed + 1)
    te1 = randomize_(CLIPTextModel(tiny_te1_config()), seed + 2)
    te2 = randomize_(CLIPTextModelWithProjection(tiny_te2_config()), seed + 3)
    shape1, shape2 = te_shapes(te1, te2)
    ldm = {
        **unet_diffusers_to_ldm(unet.state_dict(), UNetShape.from_diffusers_config(unet.config)),
        **vae_diffusers_to_ldm(vae.state_dict(), VAEShape.from_diffusers_config(vae.config)),
        **te1_transformers_to_ldm(te1.state_dict(), shape1),
        **te2_transformers_to_ldm(te2.state_dict(), shape2, kept={TE2_PREFIX + "logit_scale": torch.tensor(4.6052)}),
    }
    ldm = {k: v.detach().clone().contiguous() for k, v in ldm.items()}
    return TinySDXL(unet=unet, vae=vae, text_encoder1=te1, text_encoder2=te2, ldm=ldm)


def write_tiny_sdxl_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                               fmt: str = "safetensors") -> Path:
    """Write the tiny model as an SDXL single file (``.safetensors``, or a ``.ckpt`` pickle with the
    weights under ``state_dict``), floating tensors cast to ``dtype``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_single_file(path, {k: v.to(dtype) for k, v in build_tiny_sdxl(seed).ldm.items()}, fmt)


def write_tiny_sdxl_diffusers(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model as a Diffusers SDXL folder (``unet/``, ``vae/``, ``text_encoder/``,
    ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``, ``model_index.json``)."""
    directory = Path(directory)
    tiny = build_tiny_sdxl(seed)
    tiny.unet.save_pretrained(str(directory / "unet"))
    tiny.vae.save_pretrained(str(directory / "vae"))
    tiny.text_encoder1.save_pretrained(str(directory / "text_encoder"))
    tiny.text_encoder2.save_pretrained(str(directory / "text_encoder_2"))
    build_clip_tokenizer(v2=False).save_pretrained(str(directory / "tokenizer"))
    build_clip_tokenizer(v2=True).save_pretrained(str(directory / "tokenizer_2"))
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").save_pretrained(str(directory / "scheduler"))
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "force_zeros_for_empty_prompt": True,
    }, indent=2))
    return directory
