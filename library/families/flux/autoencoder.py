"""The FLUX.1 autoencoder ("AE", ``--ae ae.safetensors``) as a diffusers ``AutoencoderKL``.

FLUX's AE is the LDM KL autoencoder with 16 latent channels and no ``quant_conv`` /
``post_quant_conv``. BFL's file stores it with LDM key names and no prefix
(``encoder.down.0.block.0.conv1.weight``, ``encoder.conv_out.weight`` with 2 x 16 channels for mean
and log-variance, ``decoder.up.3.block.2.norm2.bias``, 1x1-conv attention weights); the same keys
under ``first_stage_model.`` / ``vae.``, a diffusers-keyed file and a diffusers folder also load.
The SD VAE key map (:mod:`library.families.sd.checkpoint.vae`) does the renaming; the shape
(channels, levels, latent channels, conv presence) is read from the file.

Latents the DiT sees ("model space") are ``(z - AE_SHIFT) * AE_SCALE`` of a posterior sample ``z``;
:func:`encode_latents` returns those (what FLUX latent caches hold), :func:`decode_latents`
inverts them. SD3's VAE is the same architecture with other statistics
(:mod:`library.families.sd3.vae`): it reuses the loader, the folder layout and
:func:`encode_shifted_latents` / :func:`decode_shifted_latents`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from library.families.sd.checkpoint import (
    CheckpointError,
    VAEShape,
    infer_vae_shape,
    infer_vae_shape_from_diffusers,
    modernize_diffusers_vae_keys,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from library.families.sd.loading import materialize, read_checkpoint, use_sdpa
from library.families.text_encoder_files import describe_state_dict

logger = logging.getLogger(__name__)

AE_SCALE = 0.3611
AE_SHIFT = 0.1159
AE_LATENT_CHANNELS = 16

_LDM_ANCHOR = "encoder.down.0.block.0.conv1.weight"
_DIFFUSERS_ANCHOR = "encoder.down_blocks.0.resnets.0.conv1.weight"
_LDM_PREFIXES = ("", "first_stage_model.", "vae.")


def ae_config(shape: VAEShape) -> dict:
    """``AutoencoderKL`` config of an AE shape, with FLUX's scale and shift (weights cannot show them)."""
    return {**shape.diffusers_config(), "scaling_factor": AE_SCALE, "shift_factor": AE_SHIFT}


def load_flux_ae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 mmap: bool = True) -> AutoencoderKL:
    """The FLUX AE from ``path`` (see the module doc), weights cast to ``dtype`` on ``device``,
    SDPA attention, eval mode. ``mmap=False`` reads a safetensors file in one sequential read.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` naming the file for
    anything that is not a 16-channel KL autoencoder (a DiT, a LoRA, a text encoder, SD's 4-channel VAE).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FLUX autoencoder not found: {path} (--ae must be a local ae.safetensors file or "
                                f"Diffusers VAE folder; nothing is downloaded)")
    if path.is_dir():
        ae = _load_folder(path, dtype, device)
    else:
        ae = ae_from_state_dict(read_checkpoint(path, mmap=mmap), path, dtype=dtype, device=device)
    if ae.config.latent_channels != AE_LATENT_CHANNELS:
        raise CheckpointError(f"{path} is a {ae.config.latent_channels}-channel VAE (SD/SDXL); FLUX needs its "
                              f"{AE_LATENT_CHANNELS}-channel autoencoder ae.safetensors for --ae")
    use_sdpa(ae)
    return ae


def vae_folder_subfolder(path: Path, flag: str) -> str | None:
    """Where a Diffusers VAE folder keeps its ``config.json``: ``"vae"`` (a pipeline folder) or None
    (the folder itself); :class:`CheckpointError` naming ``flag`` when neither has one."""
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: {flag} folder has neither config.json nor vae/config.json")
    return subfolder


def _load_folder(path: Path, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKL:
    subfolder = vae_folder_subfolder(path, "--ae")
    ae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
    return ae.to(device=device, dtype=dtype).eval()


def ae_from_state_dict(state_dict: dict[str, torch.Tensor], path: object = "autoencoder", *,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Build the AE from a loaded state dict (BFL/LDM keys under ``""``, ``first_stage_model.`` or
    ``vae.``, or diffusers keys); ``path`` names the source in errors. Unused tensors are logged."""
    prefix = next((p for p in _LDM_PREFIXES if p + _LDM_ANCHOR in state_dict), None)
    if prefix is not None:
        shape = infer_vae_shape(state_dict, prefix=prefix)
        converted = vae_ldm_to_diffusers(state_dict, shape, prefix=prefix)
        tensors, used = converted.state_dict, set(converted.used)
    elif _DIFFUSERS_ANCHOR in state_dict:
        modern = modernize_diffusers_vae_keys(state_dict)
        shape = infer_vae_shape_from_diffusers(modern)
        tensors = {k: v for k, v in modern.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                      "post_quant_conv."))}
        used = {k for k in state_dict if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    else:
        raise CheckpointError(f"{path} is not an autoencoder (--ae): it looks like {describe_state_dict(state_dict)}; "
                              f"FLUX's ae.safetensors has '{_LDM_ANCHOR}' keys")
    if shape.latent_channels != AE_LATENT_CHANNELS:
        raise CheckpointError(f"{path} is a {shape.latent_channels}-channel VAE (SD/SDXL); FLUX needs its "
                              f"{AE_LATENT_CHANNELS}-channel autoencoder ae.safetensors for --ae")
    ae = materialize(lambda: AutoencoderKL.from_config(ae_config(shape)), lambda _: tensors, "autoencoder",
                     Path(str(path)), dtype, device)
    own_prefix = prefix or ""
    unused = [k for k in state_dict if k.startswith(own_prefix) and k not in used]
    if unused:
        shown = ", ".join(sorted(unused)[:5]) + (" ..." if len(unused) > 5 else "")
        logger.warning("%s: %d tensor(s) are not used by the autoencoder and are ignored: %s", path, len(unused), shown)
    logger.info("loaded FLUX autoencoder from %s (levels %s, %d latent channels)", path, shape.block_out_channels,
                shape.latent_channels)
    return ae


def ae_state_dict_bfl(ae: AutoencoderKL, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The AE's weights in BFL's ``ae.safetensors`` layout (LDM names, 1x1-conv attention weights)
    under ``prefix``, each tensor its own contiguous copy so safetensors can save the dict."""
    shape = VAEShape.from_diffusers_config(ae.config)
    ldm = vae_diffusers_to_ldm(ae.state_dict(), shape, prefix=prefix)
    return {k: v.detach().clone().contiguous() for k, v in ldm.items()}


@torch.no_grad()
def encode_shifted_latents(vae: AutoencoderKL, images: torch.Tensor, *, scale: float, shift: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> ``(z - shift) * scale`` float32 for a posterior sample
    ``z`` (``generator`` draws its noise, on the VAE's device). The images go in the VAE's dtype."""
    first = next(vae.parameters())
    posterior = vae.encode(images.to(device=first.device, dtype=first.dtype)).latent_dist
    z = posterior.sample(generator=generator)
    return (z.float() - shift) * scale


@torch.no_grad()
def decode_shifted_latents(vae: AutoencoderKL, latents: torch.Tensor, *, scale: float, shift: float) -> torch.Tensor:
    """Inverse of :func:`encode_shifted_latents`: ``latents / scale + shift`` decoded to images
    ``[B, 3, 8h, 8w]`` float32, nominally in [-1, 1] (not clamped)."""
    first = next(vae.parameters())
    z = latents.float() / scale + shift
    return vae.decode(z.to(device=first.device, dtype=first.dtype)).sample.float()


def encode_latents(ae: AutoencoderKL, images: torch.Tensor, *, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> model-space latents ``[B, 16, H/8, W/8]`` float32:
    ``(z - AE_SHIFT) * AE_SCALE`` for a posterior sample ``z`` (``generator`` draws its noise, on
    the AE's device). These are what the DiT trains on and what FLUX latent caches hold."""
    return encode_shifted_latents(ae, images, scale=AE_SCALE, shift=AE_SHIFT, generator=generator)


def decode_latents(ae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images ``[B, 3, 8h, 8w]`` float32, nominally in [-1, 1] (not clamped;
    clamp before converting to pixels). Inverse of :func:`encode_latents`."""
    return decode_shifted_latents(ae, latents, scale=AE_SCALE, shift=AE_SHIFT)
