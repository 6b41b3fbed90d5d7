"""The bundled demo model: a small SD1-architecture text-to-image model of the shapes world.

Same structure as SD 1.x (4-level VAE with latent stride 8 and 4 latent channels, a U-Net with
cross-attention and 8 heads, a CLIP text encoder with the real 49408-token vocabulary and
``quick_gelu``), at a width that trains on a CPU. Its weights are made by
``tools/build_demo_model.py`` with this repository's own trainers and committed as one SD1 single
file, :data:`DEMO_MODEL`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTextConfig

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "shapes_demo_sd1.safetensors"
DEMO_RESOLUTION = 64
TEXT_WIDTH = 64


def demo_vae_config() -> dict:
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (32, 64, 64, 64),
            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
            "sample_size": DEMO_RESOLUTION}


def demo_unet_config() -> dict:
    # SD1's attention_head_dim=8 means 8 heads in diffusers' naming; the loader assumes it too.
    return {"sample_size": DEMO_RESOLUTION // 8, "in_channels": 4, "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (64, 128, 128), "layers_per_block": 1, "transformer_layers_per_block": 1,
            "cross_attention_dim": TEXT_WIDTH, "attention_head_dim": 8, "use_linear_projection": False,
            "norm_num_groups": 32}


def demo_text_config() -> CLIPTextConfig:
    # One head: the loader gives CLIP-L-style encoders hidden_size // 64 heads (at least one).
    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=4, num_attention_heads=1, max_position_embeddings=77,
                          hidden_act="quick_gelu")
