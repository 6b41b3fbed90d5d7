"""Lumina-Image 2.0 image generation: one prompt -> one image, shared by training previews and
``lumina_minimal_inference.py``.

Euler steps on the velocity over ``steps + 1`` sigmas from 1 to 0, linear then shifted by the flow
shift (``--fs``, default 6.0 as the reference samples: :func:`library.sampling.flow.sd3_schedule`).
The NextDiT runs at Lumina time ``t = 1 - sigma`` and predicts ``x0 - noise``, so the velocity is
its negative. Classifier-free guidance (scale ``--l``, default 3.5) runs only while
``t < cfg_trunc_ratio`` (``--ctr``, default 0.25: the noisiest part of the trajectory), with the
negative prompt (empty by default; the system prompt is not added to it) as the unconditional
branch; with ``renorm_cfg`` (``--rcfg``, default 1.0; 0 = off) the guided output of each sample is
scaled down whenever its norm exceeds ``renorm_cfg`` times the conditional output's, as the
original Lumina sampler does. Both branches run as one batch. Initial noise comes from the caller's
seeded CPU generator, so a seed gives the same image on any device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from library.families.flux.autoencoder import AE_SCALE, AE_SHIFT
from library.families.lumina import text as lumina_text
from library.sampling.flow import sample_flow, sd3_schedule
from library.sampling.pipeline import latents_to_images
from library.sampling.prompts import PromptDefaults, SamplePrompt

logger = logging.getLogger(__name__)

#: the reference's Lumina preview defaults: 1024 x 1024, scale 3.5, 38 steps; sides in multiples of 16
LUMINA_PROMPT_DEFAULTS = dict(width=1024, height=1024, steps=38, scale=3.5, size_multiple=16)
DEFAULT_SAMPLING_SHIFT = 6.0
DEFAULT_CFG_TRUNC_RATIO = 0.25
DEFAULT_RENORM_CFG = 1.0


def lumina_prompt_defaults(sampler: str | None = None) -> PromptDefaults:
    return PromptDefaults(sampler=sampler, **LUMINA_PROMPT_DEFAULTS)


def renormalized(guided: torch.Tensor, cond: torch.Tensor, renorm_cfg: float) -> torch.Tensor:
    """``guided`` scaled per sample to at most ``renorm_cfg * |cond|`` (norms over all but the batch dim)."""
    if renorm_cfg <= 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    limit = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * renorm_cfg
    norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
    # min(1, limit / norm) without reading a value back: the reference scales only when norm >= limit.
    return guided * torch.clamp(limit / norm.clamp_min(1e-12), max=1.0)


@dataclass
class LuminaSampler:
    """The models one Lumina generation needs; :meth:`generate` makes an image of a prompt."""

    dit: torch.nn.Module
    ae: torch.nn.Module
    gemma2: torch.nn.Module
    tokenizer: Any
    max_length: int = lumina_text.DEFAULT_MAX_TOKEN_LENGTH
    system_prompt: str = ""
    system_prompt_on_negative: bool = False
    shift: float = DEFAULT_SAMPLING_SHIFT

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype, *,
               system_prompt: str) -> lumina_text.LuminaTextConditioning:
        ids = lumina_text.tokenize(self.tokenizer, prompts, self.max_length, system_prompt)
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            cond = lumina_text.encode(self.gemma2, ids)
        return cond.to(device, dtype)

    def model_output(self, latents: torch.Tensor, sigma: float, cond: lumina_text.LuminaTextConditioning,
                     dtype: torch.dtype) -> torch.Tensor:
        t = torch.full((latents.shape[0],), 1.0 - sigma, device=latents.device, dtype=torch.float32)
        return self.dit(latents.to(dtype), t, cond.hidden, cond.mask).float()

    @torch.no_grad()
    def generate(self, prompt: SamplePrompt, *, generator: torch.Generator, device: torch.device | str,
                 dtype: torch.dtype, progress: bool = True) -> Image.Image:
        """One image for ``prompt`` (``prompt.seed`` is the caller's business: it seeds ``generator``)."""
        device = torch.device(device)
        if prompt.sampler:
            logger.debug("Lumina sampling always uses its Euler flow sampler; sampler %r ignored", prompt.sampler)
        trunc = DEFAULT_CFG_TRUNC_RATIO if prompt.cfg_trunc_ratio is None else prompt.cfg_trunc_ratio
        renorm = DEFAULT_RENORM_CFG if prompt.renorm_cfg is None else prompt.renorm_cfg
        guided = prompt.scale != 1.0
        cond = self.encode([prompt.prompt], device, dtype, system_prompt=self.system_prompt)
        both = None
        if guided:
            negative_system = self.system_prompt if self.system_prompt_on_negative else ""
            uncond = self.encode([prompt.negative_prompt or ""], device, dtype, system_prompt=negative_system)
            both = cond.repeat(uncond)

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            # CFG is decided on the Python float sigma of the schedule: no device value is read.
            if both is not None and 1.0 - sigma < trunc:
                out_cond, out_uncond = self.model_output(torch.cat((x, x)), sigma, both, dtype).chunk(2)
                out = renormalized(out_uncond + prompt.scale * (out_cond - out_uncond), out_cond, renorm)
            else:
                out = self.model_output(x, sigma, cond, dtype)
            return -out

        noise = torch.randn((1, 16, prompt.height // 8, prompt.width // 8), generator=generator,
                            dtype=torch.float32).to(device)
        sigmas = sd3_schedule(prompt.steps, shift=prompt.flow_shift or self.shift)
        latents = sample_flow(velocity, noise, sigmas, progress=progress)
        return latents_to_images(self.ae, latents, latent_scale=AE_SCALE, latent_shift=AE_SHIFT)[0]
