"""The SD3 / SD3.5 VAE (``SDVAE``): a 16-channel KL autoencoder, as a diffusers ``AutoencoderKL``.

It is the architecture of FLUX's AE (LDM KL autoencoder, 16 latent channels, no ``quant_conv`` /
``post_quant_conv``) with other latent statistics, so loading reuses
:func:`library.families.flux.autoencoder.ae_from_state_dict`; only the checks, the error wording
and the scale/shift are SD3's. Sources:

- the SD3 single file itself: LDM keys under ``first_stage_model.`` (SAI layout);
- a separate ``--vae`` file: the same LDM keys with or without ``first_stage_model.`` / ``vae.``,
  or diffusers keys (``encoder.down_blocks.0.resnets.0.conv1.weight``);
- a diffusers folder (``config.json`` or ``vae/config.json``).

Latents the MMDiT sees are ``(z - SD3_VAE_SHIFT) * SD3_VAE_SCALE`` of a posterior sample ``z``
(kohya's ``SDVAE`` convention; what ``_sd3.npz`` latent caches hold); :func:`encode_latents`
returns those and :func:`decode_latents` inverts them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from library.families.flux.autoencoder import (
    ae_from_state_dict, decode_shifted_latents, encode_shifted_latents, vae_folder_subfolder,
)
from library.families.sd.checkpoint import CheckpointError
from library.families.sd.loading import read_checkpoint, use_sdpa
from library.families.text_encoder_files import describe_state_dict

logger = logging.getLogger(__name__)

SD3_VAE_SCALE = 1.5305
SD3_VAE_SHIFT = 0.0609
SD3_LATENT_CHANNELS = 16

#: Where the VAE sits in an SD3 single file.
SD3_VAE_PREFIX = "first_stage_model."

_LDM_ANCHOR = "encoder.down.0.block.0.conv1.weight"
_DIFFUSERS_ANCHOR = "encoder.down_blocks.0.resnets.0.conv1.weight"
# The SD3 prefix first: an all-in-one file is the common case.
_LDM_PREFIXES = (SD3_VAE_PREFIX, "", "vae.")


def find_vae_prefix(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix the VAE's keys sit under (``first_stage_model.``, ``""``, ``vae.``; ``""`` also for
    diffusers keys), or None when the state dict holds no KL autoencoder."""
    for prefix in _LDM_PREFIXES:
        if prefix + _LDM_ANCHOR in state_dict:
            return prefix
    return "" if _DIFFUSERS_ANCHOR in state_dict else None


def has_sd3_vae(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether an SD3 single file carries its VAE (``first_stage_model.encoder.*``)."""
    return SD3_VAE_PREFIX + _LDM_ANCHOR in state_dict


def load_sd3_vae(source: str | os.PathLike | Mapping[str, torch.Tensor], *, name: object = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", mmap: bool = True,
                 flag: str = "--vae") -> AutoencoderKL:
    """The SD3 VAE from a path (file or diffusers folder) or an already read state dict.

    ``name`` names a state-dict source in errors (the SD3 file's path); ``flag`` is the option the
    file came from (``--vae``, or ``--pretrained_model_name_or_path`` for the single file's own VAE).
    Weights are cast to ``dtype`` on ``device`` (kohya keeps the VAE in float32), SDPA attention,
    eval mode, ``config.scaling_factor`` / ``shift_factor`` set to SD3's.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` (one line naming the
    source and the flag) for anything that is not a 16-channel KL autoencoder: a LoRA, an MMDiT
    without its VAE, a text encoder, an SD/SDXL 4-channel VAE.
    """
    if isinstance(source, Mapping):
        state_dict, where = source, name if name is not None else "state dict"
        vae = _from_state_dict(state_dict, where, flag, dtype, device)
    else:
        path = Path(source)
        where = name if name is not None else path
        if not path.exists():
            raise FileNotFoundError(f"SD3 VAE not found: {path} ({flag} must be a local .safetensors file or Diffusers "
                                    f"VAE folder; nothing is downloaded)")
        if path.is_dir():
            vae = _load_folder(path, flag, dtype, device)
        else:
            vae = _from_state_dict(read_checkpoint(path, mmap=mmap), where, flag, dtype, device)
    # Weights cannot show the latent statistics; record SD3's so vae.config tells the truth.
    vae.register_to_config(scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT)
    use_sdpa(vae)
    return vae


def _check_latent_channels(channels: int, where: object, flag: str) -> None:
    if channels != SD3_LATENT_CHANNELS:
        raise CheckpointError(f"{where} is a {channels}-channel VAE (SD/SDXL); SD3 needs its "
                              f"{SD3_LATENT_CHANNELS}-channel VAE ({flag})")


def _from_state_dict(state_dict: Mapping[str, torch.Tensor], where: object, flag: str, dtype: torch.dtype,
                     device: str | torch.device) -> AutoencoderKL:
    prefix = find_vae_prefix(state_dict)
    if prefix is None:
        raise CheckpointError(f"{where} holds no VAE ({flag}): it looks like {describe_state_dict(dict(state_dict))}; "
                              f"an SD3 VAE has '{SD3_VAE_PREFIX}{_LDM_ANCHOR}' (or unprefixed / diffusers) keys")
    conv_out = state_dict.get(prefix + "encoder.conv_out.weight")
    if conv_out is None:
        raise CheckpointError(f"{where}: VAE key '{prefix}encoder.conv_out.weight' is missing; the file is incomplete")
    # The encoder predicts mean and log-variance: twice the latent channels. Checked here so the
    # error speaks of SD3, not of FLUX's --ae.
    _check_latent_channels(conv_out.shape[0] // 2, where, flag)
    if prefix:
        # Only the VAE's own keys: the FLUX loader logs every other tensor under its prefix as unused.
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    vae = ae_from_state_dict(dict(state_dict), where, dtype=dtype, device=device)
    logger.info("SD3 VAE from %s%s", where, f" (under '{prefix}')" if prefix else "")
    return vae


def _load_folder(path: Path, flag: str, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKL:
    subfolder = vae_folder_subfolder(path, flag)
    try:
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a Diffusers VAE folder ({str(e).splitlines()[0]}); check "
                              f"{flag}") from e
    _check_latent_channels(vae.config.latent_channels, path, flag)
    return vae.to(device=device, dtype=dtype).eval()


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, *, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> model-space latents ``[B, 16, H/8, W/8]`` float32:
    ``(z - SD3_VAE_SHIFT) * SD3_VAE_SCALE`` for a posterior sample ``z`` (``generator`` draws its
    noise, on the VAE's device). What the MMDiT trains on and the SD3 latent caches hold."""
    return encode_shifted_latents(vae, images, scale=SD3_VAE_SCALE, shift=SD3_VAE_SHIFT, generator=generator)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images ``[B, 3, 8h, 8w]`` float32, nominally in [-1, 1] (not clamped).
    Inverse of :func:`encode_latents`."""
    return decode_shifted_latents(vae, latents, scale=SD3_VAE_SCALE, shift=SD3_VAE_SHIFT)


__all__ = [
    "SD3_LATENT_CHANNELS",
    "SD3_VAE_PREFIX",
    "SD3_VAE_SCALE",
    "SD3_VAE_SHIFT",
    "decode_latents",
    "encode_latents",
    "find_vae_prefix",
    "has_sd3_vae",
    "load_sd3_vae",
]
