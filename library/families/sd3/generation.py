"""SD3 / SD3.5 image generation: one prompt -> one image, shared by training previews and
``sd3_minimal_inference.py``.

Euler steps on the MMDiT's velocity over the SD3 schedule (``steps + 1`` sigmas from 1 to 0, shifted
by 3.0: :func:`library.sampling.flow.sd3_schedule`), with classifier-free guidance when the scale
is not 1 (the negative prompt, empty by default, is the unconditional branch). Initial noise comes
from the caller's seeded CPU generator, so a seed gives the same image on any device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from library.families.sd3 import text as sd3_text
from library.families.sd3.vae import SD3_VAE_SCALE, SD3_VAE_SHIFT
from library.sampling.flow import sample_prompt_flow, sd3_schedule
from library.sampling.pipeline import latents_to_images
from library.sampling.prompts import PromptDefaults, SamplePrompt

logger = logging.getLogger(__name__)

#: SD3 preview defaults (kohya's: 30 steps, scale 7.5), sides in multiples of 16 (8x VAE, 2x2 patches)
SD3_PROMPT_DEFAULTS = dict(width=512, height=512, steps=30, scale=7.5, size_multiple=16)
SD3_SAMPLING_SHIFT = 3.0


def sd3_prompt_defaults(sampler: str | None = None) -> PromptDefaults:
    return PromptDefaults(sampler=sampler, **SD3_PROMPT_DEFAULTS)


@dataclass
class SD3Sampler:
    """The models one SD3 generation needs; :meth:`generate` makes an image of a prompt."""

    mmdit: torch.nn.Module
    vae: torch.nn.Module
    clip_l: torch.nn.Module
    clip_g: torch.nn.Module
    t5: torch.nn.Module | None
    tokenizers: tuple[Any, Any, Any]
    t5_max_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    shift: float = SD3_SAMPLING_SHIFT

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> sd3_text.SD3TextConditioning:
        ids = sd3_text.tokenize(*self.tokenizers, prompts, t5_max_length=self.t5_max_length)
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            cond = sd3_text.encode(self.clip_l, self.clip_g, self.t5, ids, apply_lg_attn_mask=self.apply_lg_attn_mask,
                                   apply_t5_attn_mask=self.apply_t5_attn_mask, t5_width=self.mmdit.config.context_in_dim)
        return cond.to(device, dtype)

    def velocity(self, latents: torch.Tensor, sigma: float, cond: sd3_text.SD3TextConditioning,
                 dtype: torch.dtype) -> torch.Tensor:
        t = torch.full((latents.shape[0],), sigma * 1000.0, device=latents.device, dtype=torch.float32)
        return self.mmdit(latents.to(dtype), t, cond.context(), cond.pooled).float()

    @torch.no_grad()
    def generate(self, prompt: SamplePrompt, *, generator: torch.Generator, device: torch.device | str,
                 dtype: torch.dtype, progress: bool = True) -> Image.Image:
        """One image for ``prompt`` (``prompt.seed`` is the caller's business: it seeds ``generator``)."""
        device = torch.device(device)
        if prompt.sampler:
            logger.debug("SD3 sampling always uses its Euler flow sampler; sampler %r ignored", prompt.sampler)
        noise = torch.randn((1, 16, prompt.height // 8, prompt.width // 8), generator=generator,
                            dtype=torch.float32).to(device)
        sigmas = sd3_schedule(prompt.steps, shift=prompt.flow_shift or self.shift)
        latents = sample_prompt_flow(lambda texts: self.encode(texts, device, dtype),
                                     lambda x, sigma, cond: self.velocity(x, sigma, cond, dtype),
                                     prompt.prompt, prompt.negative_prompt, noise, sigmas, cfg_scale=prompt.scale,
                                     progress=progress)
        return latents_to_images(self.vae, latents, latent_scale=SD3_VAE_SCALE, latent_shift=SD3_VAE_SHIFT)[0]
