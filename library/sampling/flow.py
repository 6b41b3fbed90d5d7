"""Rectified-flow inference: the FLUX.1 / SD3 sigma schedules and the Euler sampler.

Conventions (shared with ``library/training/flow_matching.py``): ``sigma`` in [0, 1] is the noise
level of ``x_sigma = (1 - sigma) x0 + sigma eps``; sigma = 1 is pure noise, 0 the data. The
models predict the velocity ``v = dx/dsigma = eps - x0``; the timestep they receive is
``sigma * 1000`` (FLUX divides it by 1000 again inside).

Formulas:

* ``flux_mu(n) = base_shift + (max_shift - base_shift) * (n - 256) / (4096 - 256)``: linear in the
  image token count ``n = (h/2)(w/2)`` of the packed latents, through (256, 0.5) and (4096, 1.15).
* ``flux_time_shift(mu, sigma) = e^mu / (e^mu + (1/sigma - 1))`` (the exponential time shift with
  exponent 1); it maps 0 -> 0 and 1 -> 1 and pushes the middle towards noise for mu > 0.
* ``flow_shift(sigma, s) = s sigma / (1 + (s - 1) sigma)`` (SD3's / ``--discrete_flow_shift``'s
  shift); the same as the time shift with ``e^mu = s``.
* Euler step from ``sigma_i`` to ``sigma_{i+1}``: ``x <- x + (sigma_{i+1} - sigma_i) v(x, sigma_i)``.
  For data that is a single point x0 the velocity field is exactly ``v = (x - x0) / sigma``
  (= eps - x0) and Euler is exact: it returns x0 up to float error.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import torch
from tqdm.auto import tqdm

__all__ = ["FLUX_BASE_SEQ_LEN", "FLUX_MAX_SEQ_LEN", "GuidedVelocityFn", "VelocityFn", "flow_shift", "flux_mu",
           "flux_schedule", "flux_time_shift", "sample_flow", "sample_prompt_flow", "sd3_schedule"]

#: the two token counts FLUX's resolution-dependent shift is anchored at (256 = 256x256 px,
#: 4096 = 1024x1024 px, with the 16x down-sampling of AE + 2x2 packing)
FLUX_BASE_SEQ_LEN = 256
FLUX_MAX_SEQ_LEN = 4096

SigmaLike = Union[float, torch.Tensor]

#: ``velocity_fn(x, sigma) -> v`` (same shape as ``x``); ``sigma`` is a Python float.
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
#: with classifier-free guidance: ``velocity_fn(x, sigma) -> (v_cond, v_uncond)``, so the caller can
#: run both halves as one batch.
GuidedVelocityFn = Callable[[torch.Tensor, float], "tuple[torch.Tensor, torch.Tensor]"]


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` of FLUX's time shift: linear in ``image_seq_len`` through (256, base_shift), (4096, max_shift).

    Not clamped: token counts outside [256, 4096] extrapolate the line (as FLUX does).
    """
    slope = (max_shift - base_shift) / (FLUX_MAX_SEQ_LEN - FLUX_BASE_SEQ_LEN)
    return base_shift + slope * (image_seq_len - FLUX_BASE_SEQ_LEN)


def flux_time_shift(mu: float, sigma: SigmaLike) -> SigmaLike:
    """``e^mu / (e^mu + (1/sigma - 1))``, elementwise on a tensor or on one float; 0 maps to 0."""
    e_mu = math.exp(mu)
    if isinstance(sigma, torch.Tensor):
        # 1/0 = inf gives exactly 0 at sigma = 0, so no special case on tensors.
        return e_mu / (e_mu + (1.0 / sigma - 1.0))
    if sigma <= 0.0:
        return 0.0
    return e_mu / (e_mu + (1.0 / sigma - 1.0))


def flow_shift(sigma: SigmaLike, shift: float) -> SigmaLike:
    """``s sigma / (1 + (s - 1) sigma)`` (s = ``shift``; s = 1 is the identity, s > 1 moves towards noise)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _linear_sigmas(num_steps: int) -> list[float]:
    if num_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {num_steps}")
    # Computed per index (not accumulated) so the endpoints are exactly 1.0 and 0.0.
    return [1.0 - i / num_steps for i in range(num_steps + 1)]


def flux_schedule(num_steps: int, image_seq_len: int, *, shift: bool, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> list[float]:
    """``num_steps + 1`` sigmas from 1.0 to 0.0 (decreasing) for :func:`sample_flow`.

    Linear in the step index; with ``shift`` (FLUX.1 dev, Chroma) each value then goes through
    :func:`flux_time_shift` with ``mu = flux_mu(image_seq_len)``. FLUX.1 schnell uses ``shift=False``.
    """
    sigmas = _linear_sigmas(num_steps)
    if shift:
        mu = flux_mu(image_seq_len, base_shift, max_shift)
        sigmas = [float(flux_time_shift(mu, s)) for s in sigmas]
    return sigmas


def sd3_schedule(num_steps: int, shift: float = 3.0) -> list[float]:
    """``num_steps + 1`` sigmas: linear 1.0 -> 0.0, then :func:`flow_shift` by ``shift`` (SD3 uses 3.0)."""
    if shift <= 0:
        raise ValueError(f"the SD3 sampling shift must be > 0, got {shift}")
    return [float(flow_shift(s, shift)) for s in _linear_sigmas(num_steps)]


def sample_flow(velocity_fn: VelocityFn | GuidedVelocityFn, noise: torch.Tensor, sigmas: Sequence[float], *,
                cfg_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (at ``sigmas[0]``) to ``sigmas[-1]`` with Euler steps.

    ``x <- x + (sigma_next - sigma) * v`` for each consecutive pair of ``sigmas`` (Python floats,
    normally decreasing from 1.0 to 0.0, e.g. :func:`flux_schedule`). ``x`` is kept in float32
    whatever ``noise`` and the model return (the caller casts the model input if it wants).

    * ``cfg_scale == 1``: ``velocity_fn(x, sigma) -> v`` (a :data:`VelocityFn`).
    * ``cfg_scale != 1``: ``velocity_fn(x, sigma) -> (v_cond, v_uncond)`` (a :data:`GuidedVelocityFn`,
      free to batch both halves into one model call) and ``v = v_uncond + cfg_scale (v_cond - v_uncond)``.

    FLUX's embedded guidance (``--g``) is a model input, not CFG: it belongs inside ``velocity_fn``.
    The loop reads nothing back from the device; a ``tqdm`` bar shows progress unless ``progress=False``.
    """
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"sample_flow needs at least two sigmas (one step), got {len(sigmas)}")
    guided = cfg_scale != 1.0
    x = noise.float()
    pairs = list(zip(sigmas[:-1], sigmas[1:]))
    for sigma, sigma_next in tqdm(pairs, desc="sampling", leave=False, disable=not progress):
        out = velocity_fn(x, sigma)
        if guided:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(f"with cfg_scale={cfg_scale} velocity_fn must return (v_cond, v_uncond), "
                                f"got {type(out).__name__}")
            v_cond, v_uncond = out[0].float(), out[1].float()
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"with cfg_scale=1 velocity_fn must return one velocity tensor, got {type(out).__name__}")
            v = out.float()
        x = x + (sigma_next - sigma) * v
    return x


def sample_prompt_flow(encode: Callable[[list[str]], Any], velocity: Callable[[torch.Tensor, float, Any], torch.Tensor],
                       prompt: str, negative_prompt: str | None, noise: torch.Tensor, sigmas: Sequence[float], *,
                       cfg_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """:func:`sample_flow` for one prompt, with classifier-free guidance when ``cfg_scale != 1``.

    ``encode([text]) -> conditioning`` runs once for ``prompt`` and, only when guided, once for
    ``negative_prompt`` (``None`` = the empty prompt) as the unconditional branch;
    ``velocity(x, sigma, conditioning) -> v``. Returns the final latents (float32).
    """
    cond = encode([prompt])
    guided = cfg_scale != 1.0
    uncond = encode([negative_prompt or ""]) if guided else None

    def velocity_fn(x: torch.Tensor, sigma: float):
        v = velocity(x, sigma, cond)
        return (v, velocity(x, sigma, uncond)) if guided else v

    return sample_flow(velocity_fn, noise, sigmas, cfg_scale=cfg_scale, progress=progress)
