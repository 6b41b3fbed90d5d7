"""SD 1.x/2.x single-file checkpoints: LDM <-> Diffusers/transformers key maps and shape-read configs.

An original ("LDM") Stable Diffusion checkpoint holds four models under four key prefixes:

==================================  ===============================================================
``model.diffusion_model.*``         U-Net (``input_blocks``/``middle_block``/``output_blocks``)
``first_stage_model.*``             VAE (``encoder.down.i.block.j`` ...)
``cond_stage_model.transformer.*``  SD1 text encoder, CLIP ViT-L/14 (already transformers naming)
``cond_stage_model.model.*``        SD2 text encoder, OpenCLIP ViT-H/14 (fused ``in_proj``)
==================================  ===============================================================

For each part this module gives a pure function pair ``*_ldm_to_diffusers`` /
``*_diffusers_to_ldm`` plus a frozen ``*Shape`` dataclass read from tensor shapes and key
presence (never from a table of sizes). The shape object carries everything needed to map both
ways, including how the file stored tensors that our models hold in another form, so a model
loaded from a file is written back in exactly that file's layout:

- SD2 stores the U-Net ``proj_in``/``proj_out`` as Linear ``[C, C]``; our U-Net always uses 1x1
  convs (the LoRA file format needs conv-shaped ``proj_in`` for SD2), so they are reshaped on load
  and reshaped back on save (:attr:`UNetShape.stored_linear_projection`).
- The VAE attention q/k/v/proj_out are 1x1 convs in LDM files and Linear in diffusers
  (:attr:`VAEShape.attention_weight_ndim`).
- SD2's OpenCLIP has one more transformer block than the model we run: SD2 conditions on the
  penultimate layer, so we build a transformers ``CLIPTextModel`` without the last block (whose
  plain output then *is* the penultimate layer). The dropped block, ``text_projection`` and
  ``logit_scale`` are reported as unused and kept by the loader for the write-back.

Every ``*_ldm_to_diffusers`` returns a :class:`Converted`: the diffusers-layout state dict plus
which source keys it used and which keys under its prefix it did not understand, so callers keep
the rest (``model_ema.*``, ``alphas_cumprod``, ``...position_ids``) instead of losing it. Every
``*_diffusers_to_ldm`` refuses a key it cannot place, so a save never silently drops weights.

transformers 5 removed the ``text_model.`` level from ``CLIPTextModel`` module paths; the
functions here accept both namings on input and produce whichever ``hf_prefix`` asks for
(see :func:`transformers_text_prefix`).

The code is split by part: :mod:`.common` (prefixes, :class:`CheckpointError`, :class:`Converted`,
the renaming engine), :mod:`.unet`, :mod:`.vae` and :mod:`.text_encoder` (CLIP-L and OpenCLIP);
every public name is re-exported here, so ``from library.families.sd.checkpoint import X`` works.
"""

from __future__ import annotations

from .common import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    Converted,
    Parts,
    StateDict,
    refuse_non_base_models,
)
from .text_encoder import (
    TextEncoderKind,
    TextEncoderShape,
    clip_diffusers_to_ldm,
    clip_ldm_to_diffusers,
    detect_text_encoder_kind,
    infer_clip_shape,
    infer_openclip_shape,
    infer_text_encoder_shape,
    openclip_diffusers_to_ldm,
    openclip_ldm_to_diffusers,
    placeholder_openclip_keys,
    text_encoder_diffusers_to_ldm,
    text_encoder_kind_of_config,
    text_encoder_ldm_to_diffusers,
    transformers_text_prefix,
)
from .unet import (
    UNetShape,
    infer_unet_shape,
    ldm_module_path,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from .vae import (
    VAEShape,
    infer_vae_shape,
    infer_vae_shape_from_diffusers,
    modernize_diffusers_vae_keys,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)

__all__ = [
    "CLIP_PREFIX",
    "CheckpointError",
    "Converted",
    "OPENCLIP_PREFIX",
    "Parts",
    "StateDict",
    "TextEncoderKind",
    "TextEncoderShape",
    "UNET_PREFIX",
    "UNetShape",
    "VAEShape",
    "VAE_PREFIX",
    "clip_diffusers_to_ldm",
    "clip_ldm_to_diffusers",
    "detect_text_encoder_kind",
    "infer_clip_shape",
    "infer_openclip_shape",
    "infer_text_encoder_shape",
    "infer_unet_shape",
    "ldm_module_path",
    "infer_vae_shape",
    "infer_vae_shape_from_diffusers",
    "modernize_diffusers_vae_keys",
    "openclip_diffusers_to_ldm",
    "openclip_ldm_to_diffusers",
    "placeholder_openclip_keys",
    "refuse_non_base_models",
    "text_encoder_diffusers_to_ldm",
    "text_encoder_kind_of_config",
    "text_encoder_ldm_to_diffusers",
    "transformers_text_prefix",
    "unet_diffusers_to_ldm",
    "unet_ldm_to_diffusers",
    "vae_diffusers_to_ldm",
    "vae_ldm_to_diffusers",
]
