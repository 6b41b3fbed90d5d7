"""FLUX.1 image generation: one prompt -> one image, shared by training previews and
``flux_minimal_inference.py``.

The schedule is FLUX's: ``steps + 1`` sigmas from 1 to 0, time-shifted by the image token count for
dev (the guidance-distilled model) and not for schnell (:func:`library.sampling.flow.flux_schedule`);
Euler steps on the predicted velocity (:func:`library.sampling.flow.sample_flow`). ``--g`` is the
embedded guidance of dev models; ``--l`` (CFG scale) other than 1 runs the negative prompt too and
mixes the two velocities. Initial noise comes from the caller's seeded CPU generator, so a seed gives
the same image on any device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from library.families.flux import text as flux_text
from library.families.flux.autoencoder import AE_SCALE, AE_SHIFT
from library.families.flux.model import image_ids, pack_latents, text_ids, unpack_latents
from library.sampling.flow import flux_schedule, sample_prompt_flow
from library.sampling.pipeline import latents_to_images
from library.sampling.prompts import PromptDefaults, SamplePrompt

logger = logging.getLogger(__name__)

#: kohya's FLUX preview defaults: 20 steps, 512 x 512, embedded guidance 3.5, no CFG, sides /16
FLUX_PROMPT_DEFAULTS = dict(width=512, height=512, steps=20, scale=1.0, guidance_scale=3.5, size_multiple=16)


def flux_prompt_defaults(sampler: str | None = None) -> PromptDefaults:
    return PromptDefaults(sampler=sampler, **FLUX_PROMPT_DEFAULTS)


def chroma_prompt_defaults(sampler: str | None = None) -> PromptDefaults:
    """FLUX's defaults with ``--g 0``: Chroma is not guidance-distilled (the reference docs ask for
    ``--g 0`` and real CFG, e.g. ``--l 4 --n <negative prompt>``)."""
    return PromptDefaults(sampler=sampler, **{**FLUX_PROMPT_DEFAULTS, "guidance_scale": 0.0})


@dataclass
class FluxSampler:
    """The models one FLUX generation needs; :meth:`generate` makes an image of a prompt."""

    flux: torch.nn.Module
    ae: torch.nn.Module
    clip_l: torch.nn.Module | None
    t5: torch.nn.Module
    clip_tokenizer: Any
    t5_tokenizer: Any
    t5_max_length: int
    apply_t5_attn_mask: bool = False
    #: a FLUX ControlNet and its control image [1, 3, H, W] in [0, 1] (the image's size): residuals every step
    controlnet: torch.nn.Module | None = None
    control_image: torch.Tensor | None = None

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> flux_text.FluxTextConditioning:
        ids = flux_text.tokenize(self.clip_tokenizer, self.t5_tokenizer, prompts, self.t5_max_length)
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            cond = flux_text.encode(self.clip_l, self.t5, ids, apply_t5_attn_mask=self.apply_t5_attn_mask)
        return cond.to(device, dtype)

    def velocity(self, latents: torch.Tensor, sigma: float, cond: flux_text.FluxTextConditioning,
                 guidance: float | None, dtype: torch.dtype) -> torch.Tensor:
        """The DiT's velocity for unpacked latents [B,16,h,w] at one sigma (float32 out)."""
        batch, _, height, width = latents.shape
        device = latents.device
        img = pack_latents(latents).to(dtype)
        ids = image_ids(batch, height, width, device=device, dtype=dtype)
        txt_ids = text_ids(batch, cond.t5_out.shape[1], device=device, dtype=dtype)
        t = torch.full((batch,), sigma, device=device, dtype=dtype)
        g = None
        if self.flux.config.guidance_embed:
            g = torch.full((batch,), 3.5 if guidance is None else guidance, device=device, dtype=dtype)
        mask = cond.t5_attn_mask if self.apply_t5_attn_mask else None
        inputs = (img, ids, cond.t5_out, txt_ids, t, cond.l_pooled, g)
        residuals = {}
        if self.controlnet is not None and self.control_image is not None:
            from library.families.flux.controlnet import residual_kwargs

            residuals = residual_kwargs(self.controlnet, img, ids, self.control_image, *inputs[2:], mask)
        out = self.flux(*inputs, txt_attention_mask=mask, **residuals)
        return unpack_latents(out.float(), height, width)

    @torch.no_grad()
    def generate(self, prompt: SamplePrompt, *, generator: torch.Generator, device: torch.device | str,
                 dtype: torch.dtype, progress: bool = True) -> Image.Image:
        """One image for ``prompt`` (``prompt.seed`` is the caller's business: it seeds ``generator``)."""
        device = torch.device(device)
        if prompt.sampler:
            logger.debug("FLUX sampling always uses its Euler flow sampler; sampler %r ignored", prompt.sampler)
        height, width = prompt.height // 8, prompt.width // 8
        noise = torch.randn((1, 16, height, width), generator=generator, dtype=torch.float32).to(device)
        sigmas = flux_schedule(prompt.steps, (height // 2) * (width // 2), shift=self.flux.config.guidance_embed)
        latents = sample_prompt_flow(lambda texts: self.encode(texts, device, dtype),
                                     lambda x, sigma, cond: self.velocity(x, sigma, cond, prompt.guidance_scale, dtype),
                                     prompt.prompt, prompt.negative_prompt, noise, sigmas, cfg_scale=prompt.scale,
                                     progress=progress)
        return latents_to_images(self.ae, latents, latent_scale=AE_SCALE, latent_shift=AE_SHIFT)[0]
