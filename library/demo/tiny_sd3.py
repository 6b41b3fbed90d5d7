"""Tiny SD3 / SD3.5 MMDiTs in the real SAI key layout, with deterministic random weights.

Three variants, each with the switches of a released model:

- ``"sd3_medium"``: plain MMDiT (no qk-norm), last context block pre-only;
- ``"sd35_large"``: with qk-norm (``attn.ln_q`` / ``attn.ln_k``);
- ``"sd35_medium"``: qk-norm and MMDiT-X (``x_block.attn2`` in the first blocks), and a larger
  position table (32 x 32 instead of 16 x 16, as 3.5 Medium's 384 against 192).

Width 64 (one head of 64: SD3 head dim), 4 joint blocks (enough for ``--blocks_to_swap 2``, which
keeps 2 on the device), 16 latent channels, patch 2, context (T5 / padded CLIP) width 32, pooled
width ``adm_in_channels`` (default 28 = tiny CLIP-L 12 + tiny CLIP-G 16, which also fit, zero-padded,
into the 32-wide context). The position table is the
real sin-cos table (``sincos_pos_embed_table``) for a base grid of ``TINY_BASE_SIZE`` patches
(64 x 64 latents = 512 px), not random. Files are written with the keys of the SAI checkpoints
(by default under ``model.diffusion_model.``), so they go through the same loader as real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from library.demo.tiny_dit import random_dit_state_dict, write_dit_file
from library.families.sd3.model import CHECKPOINT_PREFIX, SD3Config, SD3MMDiT, sincos_pos_embed_table

TINY_SD3_VARIANTS = ("sd3_medium", "sd35_large", "sd35_medium")
TINY_CONTEXT_DIM = 32
TINY_ADM_DIM = 28
TINY_BASE_SIZE = 8  # patches a side of the "training resolution" the table is generated for


def tiny_sd3_config(variant: str = "sd3_medium", *, adm_in_channels: int = TINY_ADM_DIM) -> SD3Config:
    """The tiny config of ``variant`` (one of ``TINY_SD3_VARIANTS``)."""
    if variant not in TINY_SD3_VARIANTS:
        raise ValueError(f"tiny SD3 variant must be one of {', '.join(TINY_SD3_VARIANTS)}, got {variant!r}")
    return SD3Config(
        hidden_size=64, depth=4, num_heads=1, patch_size=2, in_channels=16, out_channels=16,
        context_in_dim=TINY_CONTEXT_DIM, adm_in_channels=adm_in_channels, mlp_ratio=4.0,
        pos_embed_max_size=32 if variant == "sd35_medium" else 16,
        qk_norm=None if variant == "sd3_medium" else "rms",
        x_block_self_attn_layers=(0, 1) if variant == "sd35_medium" else (),
        final_context_pre_only=True,
    )


def random_sd3_state_dict(config: SD3Config, seed: int = 0, *,
                          base_size: int = TINY_BASE_SIZE) -> dict[str, torch.Tensor]:
    """Float32 weights for every key of ``SD3MMDiT(config)``, the same for the same (config, seed).

    The recipe of :func:`library.demo.tiny_dit.random_dit_state_dict`: weight matrices
    N(0, 1/fan_in), small biases, qk-norm weights near 1; nothing is zero (unlike a fresh SAI init of
    the modulations and final layer), so outputs depend on every input. ``pos_embed`` is the sin-cos
    table whose base grid is ``base_size`` patches (``sincos_pos_embed_table``), not random.
    """
    table = sincos_pos_embed_table(config.hidden_size, config.pos_embed_max_size, base_size)
    return random_dit_state_dict(lambda: SD3MMDiT(config), seed, norm_suffixes=(".ln_q.weight", ".ln_k.weight"),
                                 fixed={"pos_embed": table})


def write_tiny_sd3_mmdit(path: str | os.PathLike, variant: str = "sd3_medium", *, prefix: str = CHECKPOINT_PREFIX,
                         dtype: torch.dtype = torch.float32, seed: int = 0,
                         adm_in_channels: int = TINY_ADM_DIM) -> Path:
    """Write the tiny MMDiT of ``variant`` as a safetensors file with SAI keys under ``prefix``
    (``"model.diffusion_model."`` as in SAI's single-file checkpoints, or ``""``)."""
    def make_state_dict() -> dict[str, torch.Tensor]:
        return random_sd3_state_dict(tiny_sd3_config(variant, adm_in_channels=adm_in_channels), seed=seed)

    return write_dit_file(path, make_state_dict, prefix=prefix, dtype=dtype, allowed_prefixes=("", CHECKPOINT_PREFIX),
                          caller="write_tiny_sd3_mmdit")
