"""Sampler names (``--sample_sampler``, ``--ss``, gen_img ``--sampler``) -> configured diffusers schedulers.

Contract
--------
:func:`make_scheduler` returns a *fresh* diffusers scheduler (schedulers are stateful: never share
one between two generations) configured with the SD/SDXL training schedule: 1000 steps,
``scaled_linear`` betas 0.00085 -> 0.012, ``prediction_type`` ``"v_prediction"`` or ``"epsilon"``.

Conventions follow the Stable Diffusion scheduler configs that diffusers pipelines use:
``steps_offset=1`` (only matters for "leading" spacing: DDIM, PNDM), ``set_alpha_to_one=False``
(DDIM/PNDM), ``skip_prk_steps=True`` (PNDM: plain PLMS, one model call per step) and
``clip_sample=False`` (clamping x0 to [-1, 1] is meant for pixel-space models, not latents).

``zero_terminal_snr=True`` rescales the betas so the last training timestep is pure noise, and
uses "trailing" timestep spacing so sampling starts at that timestep (Lin et al. 2023, "Common
Diffusion Noise Schedules and Sample Steps are Flawed"). Schedulers with a native
``rescale_betas_zero_snr`` option use it; the others get the rescaled betas as ``trained_betas``,
with the final cumulative alpha kept at 2**-24 instead of 0 (as diffusers does natively for its
sigma-based schedulers) so that sigma = sqrt((1 - a) / a) stays finite.

Names: ``ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++, dpmsingle``;
``k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a`` are aliases of the names without ``k_``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import numpy as np
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

logger = logging.getLogger(__name__)

__all__ = ["SAMPLER_NAMES", "SD_TRAIN_SCHEDULE", "make_scheduler", "zero_terminal_snr_betas"]

#: The DDPM schedule SD 1.x/2.x and SDXL were trained with.
SD_TRAIN_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# Cumulative alpha used in place of exactly 0 at the last timestep (see module docstring).
_ZERO_SNR_FLOOR = 2.0**-24


class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
    """diffusers' LMS scheduler without the scipy dependency.

    The LMS coefficient is the integral of a Lagrange basis polynomial between two sigmas;
    diffusers integrates it numerically with ``scipy.integrate.quad``. The integrand is a
    polynomial, so we integrate it exactly with numpy instead (same values, no scipy needed).
    """

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sigmas = self.sigmas.double()
        node = float(sigmas[t - current_order])
        others = [float(sigmas[t - k]) for k in range(order) if k != current_order]
        # Lagrange basis: 1 at `node`, 0 at the other sigmas (order 1: the constant 1).
        basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
        basis = basis / float(np.prod([node - r for r in others]))
        antiderivative = basis.integ()
        return float(antiderivative(float(sigmas[t + 1])) - antiderivative(float(sigmas[t])))


# name -> (scheduler class, options beyond the shared ones)
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "lms": (ExactLMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    # First-order-final "dpmsolver" cannot end on sigma 0 in diffusers; it requires sigma_min.
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    # diffusers switches this on itself (with a warning per call) when ending on sigma 0.
    "dpmsingle": (DPMSolverSinglestepScheduler, {"lower_order_final": True}),
}
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}

#: Every accepted sampler name, in the reference's order.
SAMPLER_NAMES: tuple[str, ...] = (*_SCHEDULERS, *_ALIASES)


def zero_terminal_snr_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                            beta_end: float = 0.012, *, floor: float = 0.0) -> np.ndarray:
    """Scaled-linear betas rescaled so that the last timestep has zero SNR (float64).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    betas are then recovered from the ratios of consecutive alpha_bar. ``floor`` > 0 replaces the
    final alpha_bar of 0 by ``floor`` (needed by schedulers that divide by it).
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    abar = ((sqrt_abar - last) * first / (first - last)) ** 2
    abar[-1] = floor
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return key


def make_scheduler(
    name: str,
    *,
    v_parameterization: bool,
    zero_terminal_snr: bool = False,
    clip_sample: bool = False,
    steps_offset: int = 1,
) -> SchedulerMixin:
    """A new diffusers scheduler for sampler ``name`` (case-insensitive; see :data:`SAMPLER_NAMES`).

    ``v_parameterization`` selects ``prediction_type="v_prediction"`` (else ``"epsilon"``).
    ``zero_terminal_snr`` rescales the schedule (see the module docstring). ``clip_sample`` clamps
    predicted x0 to [-1, 1] where the scheduler supports it (DDIM, Heun). ``steps_offset=0`` is
    gen_img's ``--force_scheduler_zero_steps_offset``. Raises ``ValueError`` for an unknown name.
    """
    cls, extra = _SCHEDULERS[_canonical(name)]
    accepted = set(inspect.signature(cls.__init__).parameters)
    options: dict[str, Any] = {
        **SD_TRAIN_SCHEDULE,
        **extra,
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
        "clip_sample": clip_sample,
        "steps_offset": steps_offset,
    }
    if zero_terminal_snr:
        if not v_parameterization:
            # An eps-model cannot recover x0 from pure noise; DDIM then divides by alpha_bar = 0.
            logger.warning("zero_terminal_snr without v_parameterization: samples may be NaN or noise")
        options["timestep_spacing"] = "trailing"
        if "rescale_betas_zero_snr" in accepted:
            options["rescale_betas_zero_snr"] = True
        else:
            betas = zero_terminal_snr_betas(
                SD_TRAIN_SCHEDULE["num_train_timesteps"], SD_TRAIN_SCHEDULE["beta_start"],
                SD_TRAIN_SCHEDULE["beta_end"], floor=_ZERO_SNR_FLOOR,
            )
            options["trained_betas"] = betas.tolist()
    # Not every scheduler takes every option (PNDM has no clip_sample, DPM-single no
    # timestep_spacing); drop what the class does not accept rather than failing.
    with warnings.catch_warnings():
        # diffusers flags algorithm_type="dpmsolver" as deprecated (FutureWarning) on every
        # construction, i.e. on every preview image; it is still a supported reference name.
        warnings.filterwarnings("ignore", message=".*algorithm_type.*dpmsolver.*deprecated", category=FutureWarning)
        return cls(**{k: v for k, v in options.items() if k in accepted})
