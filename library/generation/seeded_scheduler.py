"""A scheduler proxy for ``gen_img.py``: each image's own noise, and the inpainting blend.

The shared loop (:func:`library.sampling.pipeline.sample_latents`) draws noise for the whole
batch from one generator; gen_img wants every image to depend only on its own seed, so
:class:`SeededScheduler` replaces the noise ``add_noise`` gets by the images' own noise and gives
``step`` (ancestral samplers) the images' own generators. With a mask it also blends the kept
region back after each step (rules in :mod:`library.generation.runner`).
"""

from __future__ import annotations

import torch

__all__ = ["SeededScheduler"]


class SeededScheduler:
    """A scheduler proxy for ``sample_latents``: per-image noise and inpainting blend.

    ``add_noise`` uses the images' own ``noise`` (txt2img: ``noise * init_noise_sigma``, reached
    through the img2img path with strength 1); ``step`` gets the images' own generators (ancestral
    samplers) and, with a ``mask``, blends the kept region back after each step.
    """

    def __init__(self, inner, noise: torch.Tensor, generators: list[torch.Generator], *, txt2img: bool,
                 init: torch.Tensor | None = None, mask: torch.Tensor | None = None, steps: int = 0,
                 strength: float = 1.0) -> None:
        self._inner = inner
        self._noise = noise
        self._generators = generators
        self._txt2img = txt2img
        self._init = init
        self._mask = mask
        self._steps = steps
        self._strength = strength
        self._calls = 0
        inner_step = inner.step

        def step(model_output, timestep, sample, *a, **kw):
            if "generator" in kw:
                kw["generator"] = self._generators
            out = inner_step(model_output, timestep, sample, *a, **kw)
            if self._mask is None:
                return out
            self._calls += 1
            latents = out[0] if isinstance(out, tuple) else out.prev_sample
            blended = self._blend(latents)
            if isinstance(out, tuple):
                return (blended, *out[1:])
            out.prev_sample = blended
            return out

        step.__wrapped__ = inner_step  # inspect.signature(step) shows the real parameters (generator)
        self.step = step

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        own = self._noise.to(original.device, torch.float32)
        if self._txt2img:
            return own * self._inner.init_noise_sigma
        return self._inner.add_noise(original, own, timesteps)

    def _blend(self, latents: torch.Tensor) -> torch.Tensor:
        inner = self._inner
        kept = min(int(self._steps * self._strength), self._steps)
        tail = inner.timesteps[(self._steps - kept) * inner.order:]
        init = self._init.to(latents.device, torch.float32)
        if self._calls >= len(tail):
            reference = init
        else:
            t = tail[self._calls : self._calls + 1].repeat(latents.shape[0])
            reference = inner.add_noise(init, self._noise.to(latents.device, torch.float32), t)
        mask = self._mask.to(latents.device, latents.dtype)
        return mask * latents + (1.0 - mask) * reference.to(latents.dtype)
