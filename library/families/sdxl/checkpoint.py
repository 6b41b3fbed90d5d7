"""SDXL single-file checkpoints (SAI/SGM layout): key prefixes, shape reading and the text-encoder maps.

An SDXL base checkpoint holds four models:

==========================================  ====================================================
``model.diffusion_model.*``                 U-Net, LDM/SGM names (see ``sd.checkpoint.unet``)
``first_stage_model.*``                     VAE, same layout as SD's
``conditioner.embedders.0.transformer.*``   text encoder 1, CLIP ViT-L/14 (transformers names)
``conditioner.embedders.1.model.*``         text encoder 2, OpenCLIP ViT-bigG/14 (fused ``in_proj``,
                                            ``text_projection`` [D, P], ``logit_scale``)
==========================================  ====================================================

The U-Net and VAE maps are SD's (the U-Net shape records SDXL's differences). Text encoder 1 is
SD1's CLIP map under another prefix. Text encoder 2 is SD2's OpenCLIP map with every block kept
(SDXL's pooled output is read after the last block) plus the projection: OpenCLIP multiplies
``x @ text_projection``, transformers' ``CLIPTextModelWithProjection`` applies a Linear, so the
weight is the transpose. ``logit_scale`` is not used by any model; the loader keeps it (with any
other unused tensor) so a saved single file has the keys the original had.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from library.families.script_hints import fix_for
from library.families.sd.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    Converted,
    StateDict,
    TextEncoderShape,
    clip_diffusers_to_ldm,
    clip_ldm_to_diffusers,
    infer_clip_shape,
    infer_openclip_shape,
    openclip_diffusers_to_ldm,
    openclip_ldm_to_diffusers,
    refuse_non_base_models,
)

TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
PROJECTION_KEY = "text_projection.weight"


def te1_shape(state_dict: StateDict) -> TextEncoderShape:
    return infer_clip_shape(state_dict, TE1_PREFIX, what="SDXL text encoder 1 (CLIP-L)")


def te2_shape(state_dict: StateDict) -> TextEncoderShape:
    return infer_openclip_shape(state_dict, TE2_PREFIX, runs_all_blocks=True,
                                what="SDXL text encoder 2 (OpenCLIP bigG)")


def te2_projection_dim(state_dict: StateDict) -> int:
    key = TE2_PREFIX + "text_projection"
    if key not in state_dict:
        raise CheckpointError(f"SDXL text encoder 2: key '{key}' is missing; the pooled text embedding cannot be "
                              f"computed without it")
    return int(state_dict[key].shape[1])


def te2_transformers_config(shape: TextEncoderShape, projection_dim: int) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of ``CLIPTextModelWithProjection`` for text encoder 2 (pad id 0 = ``!``)."""
    return {**shape.transformers_config(), "projection_dim": projection_dim, "pad_token_id": 0}


def te1_ldm_to_transformers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = "") -> Converted:
    return clip_ldm_to_diffusers(state_dict, shape, hf_prefix=hf_prefix)


def te1_transformers_to_ldm(state_dict: StateDict, shape: TextEncoderShape) -> dict[str, torch.Tensor]:
    return clip_diffusers_to_ldm(state_dict, shape)


def te2_ldm_to_transformers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = "text_model."
                            ) -> Converted:
    """OpenCLIP bigG keys -> ``CLIPTextModelWithProjection`` keys (the transformer under ``hf_prefix``,
    ``text_projection.weight`` beside it). ``logit_scale`` and unknown keys are reported unused."""
    converted = openclip_ldm_to_diffusers(state_dict, shape, hf_prefix=hf_prefix)
    key = shape.ldm_prefix + "text_projection"
    if key not in state_dict:
        raise CheckpointError(f"SDXL text encoder 2: key '{key}' is missing; the checkpoint is incomplete")
    out = dict(converted.state_dict)
    out[PROJECTION_KEY] = state_dict[key].t().contiguous()
    return Converted(out, converted.used | {key}, tuple(k for k in converted.unused if k != key))


def te2_transformers_to_ldm(state_dict: StateDict, shape: TextEncoderShape, *,
                            kept: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` state dict -> the OpenCLIP bigG keys of an SDXL file.

    ``logit_scale`` comes from ``kept`` (the loaded file's unused tensors) or CLIP's initial value.
    """
    if PROJECTION_KEY not in state_dict:
        raise CheckpointError("SDXL text encoder 2 has no text_projection; it must be a CLIPTextModelWithProjection")
    body = {k: v for k, v in state_dict.items() if k != PROJECTION_KEY}
    kept = dict(kept or {})
    kept[shape.ldm_prefix + "text_projection"] = state_dict[PROJECTION_KEY].t().contiguous()
    return openclip_diffusers_to_ldm(body, shape, kept=kept)


def check_sdxl_state_dict(state_dict: StateDict, path: Any, *, need_vae: bool = True) -> None:
    """Raise :class:`CheckpointError` (what, where, how to fix) unless ``state_dict`` is an SDXL
    base single file."""
    keys = list(state_dict)
    refuse_non_base_models(state_dict, path)
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise CheckpointError(f"{path} is an SD1/SD2 checkpoint (cond_stage_model.* keys): {fix_for('sd')}")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"{path} is not an SDXL checkpoint: no '{UNET_PREFIX}*' keys")
    if f"{UNET_PREFIX}label_emb.0.0.weight" not in state_dict:
        raise CheckpointError(f"{path}: the U-Net has no label_emb (size/pooled-text embedding): not an SDXL model; "
                              f"for an SD1/SD2 model {fix_for('sd')}")
    if not any(k.startswith(TE1_PREFIX) for k in keys):
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise CheckpointError(f"{path} is an SDXL refiner (a single OpenCLIP text encoder); only SDXL base models "
                                  f"can be trained")
        raise CheckpointError(f"{path} has no SDXL text encoder 1 ('{TE1_PREFIX}*' keys)")
    if not any(k.startswith(TE2_PREFIX) for k in keys):
        raise CheckpointError(f"{path} has no SDXL text encoder 2 ('{TE2_PREFIX}*' keys)")
    if need_vae and not any(k.startswith(VAE_PREFIX) for k in keys):
        raise CheckpointError(f"{path} has no VAE (first_stage_model.* keys): give one with --vae")
