"""Noise and timestep options of the DDPM objective (``--noise_offset`` ... ``--max_timestep``).

Every function here is pure tensor math on the device; nothing reads a tensor back to the host,
so none of them forces a device synchronisation. Random draws use the global torch RNG (seeded by
``--seed``) unless a ``generator`` is given, which is what the tests do.

Formulas (B batch, C channels, latents x0 [B,C,h,w], eps ~ N(0, I)):

* noise offset: ``eps' = eps + o_b * n_bc`` with ``n_bc ~ N(0,1)`` one value per (sample, channel)
  broadcast over h, w. ``o_b = noise_offset`` or, with ``--noise_offset_random_strength``,
  ``noise_offset * u_b`` with ``u_b ~ U(0,1)``. With ``--adaptive_noise_scale s``:
  ``o_bc = max(0, o_b + s * |mean_hw(x0_bc)|)`` (a negative s can only lower the offset to 0).
* multires (pyramid) noise: for ``i = 1 .. iterations``: ``r ~ U(2,4)``, draw noise at
  ``(h / r**i, w / r**i)`` (integer sizes), upsample bilinearly to (h, w) and add it with weight
  ``discount**i``; stop after the level whose side reaches 1. The sum is divided by its
  standard deviation (over the whole batch) so it is unit-variance noise again.
* input perturbation (``--ip_noise_gamma g``): the model input uses ``eps + g_b * xi`` with
  ``xi ~ N(0, I)`` (``g_b = g`` or ``g * u_b`` with ``--ip_noise_gamma_random_strength``), while
  the target is still built from ``eps`` alone.
* timesteps: uniform integers in ``[min_timestep, max_timestep)``; equal bounds give that
  constant timestep for every sample.
* zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed"): ``sqrt(abar)`` is shifted so the last value is 0 and scaled so the first is
  unchanged, ``sqrt(abar)' = (sqrt(abar) - sqrt(abar_T)) * sqrt(abar_1) / (sqrt(abar_1) - sqrt(abar_T))``;
  the betas are recovered from consecutive ratios ``beta_t = 1 - abar_t / abar_{t-1}``.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseConfig:
    """The noise/timestep flags of one run (all off by default)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NoiseConfig":
        # getattr: scripts whose parser lacks these flags (tools, custom trainers) get the defaults.
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(args, name) for name in names if getattr(args, name, None) is not None})


def timestep_bounds(config: NoiseConfig, num_timesteps: int = 1000) -> tuple[int, int]:
    """``(low, high)`` of the sampled timesteps: ``[low, high)``, or the constant ``low`` if equal."""
    low = 0 if config.min_timestep is None else config.min_timestep
    high = num_timesteps if config.max_timestep is None else config.max_timestep
    return low, high


def sample_timesteps(batch_size: int, low: int, high: int, device: torch.device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Long ``[B]``: uniform integers in ``[low, high)``; ``low == high`` gives ``low`` everywhere."""
    if low == high:
        return torch.full((batch_size,), low, dtype=torch.long, device=device)
    return torch.randint(low, high, (batch_size,), device=device, dtype=torch.long, generator=generator)


def _uniform_per_sample(ref: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``u_b ~ U(0,1)`` shaped ``[B,1,1,...]`` to broadcast over ``ref``."""
    shape = (ref.shape[0],) + (1,) * (ref.ndim - 1)
    return torch.rand(shape, device=ref.device, dtype=ref.dtype, generator=generator)


def apply_noise_offset(latents: torch.Tensor, noise: torch.Tensor, offset: float, *,
                       adaptive_scale: float | None = None, random_strength: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``eps + o * n`` with one ``n ~ N(0,1)`` per (sample, channel); see the module docstring for ``o``."""
    strength = offset * _uniform_per_sample(latents, generator) if random_strength else \
        torch.full((latents.shape[0],) + (1,) * (latents.ndim - 1), offset, device=latents.device, dtype=latents.dtype)
    if adaptive_scale is not None:
        spatial = tuple(range(2, latents.ndim))
        strength = (strength + adaptive_scale * latents.mean(dim=spatial, keepdim=True).abs()).clamp(min=0.0)
    per_channel = torch.randn(latents.shape[:2] + (1,) * (latents.ndim - 2), device=latents.device,
                              dtype=latents.dtype, generator=generator)
    return noise + strength * per_channel


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, *,
                  generator: torch.Generator | None = None, rng: random.Random | None = None) -> torch.Tensor:
    """Multi-resolution noise: ``noise`` plus coarser upsampled noise levels, renormalised to unit std.

    The down-scale factor of each level is ``r**i`` with ``r ~ U(2, 4)`` drawn on the host (Python
    ``random``, seeded by ``--seed``) so no device value is read back.
    """
    b, c, h, w = noise.shape
    draw = rng.random if rng is not None else random.random
    out = noise
    for i in range(1, iterations + 1):
        r = 2 + 2 * draw()
        lh, lw = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, lh, lw), device=noise.device, dtype=noise.dtype, generator=generator)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if lh == 1 or lw == 1:
            break
    return out / out.std()


def input_perturbation(noise: torch.Tensor, gamma: float, *, random_strength: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``eps + g * xi``: the noise that goes into the model input (the target keeps ``eps``)."""
    g = gamma * _uniform_per_sample(noise, generator) if random_strength else gamma
    return noise + g * torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)


def make_noise(latents: torch.Tensor, config: NoiseConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training noise ``eps`` for ``latents``: N(0, I), then noise offset, then pyramid noise."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    if config.noise_offset:
        noise = apply_noise_offset(latents, noise, config.noise_offset, adaptive_scale=config.adaptive_noise_scale,
                                   random_strength=config.noise_offset_random_strength, generator=generator)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, config.multires_noise_iterations, config.multires_noise_discount,
                              generator=generator)
    return noise


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that ``abar`` of the last timestep is exactly 0 (float64 in, float64 out)."""
    betas = betas.double()
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas
