"""The rectified-flow training objective shared by FLUX.1 / Chroma and SD3 (the DDPM one is
``library/families/ddpm.py``).

Notation: latents ``x0`` [B, ...], noise ``eps ~ N(0, I)``, noise level ``sigma`` in [0, 1] per
sample. Formulas (reference: kohya_surface.md §7.3 FLUX, §7.4 SD3):

* noisy input ``x_t = (1 - sigma) x0 + sigma eps``; the DiT predicts the velocity
  ``v = dx_t/dsigma = eps - x0``, which is the training target. With ``--ip_noise_gamma g`` (input
  perturbation) ``x_t`` uses ``eps + g_b xi`` (``xi ~ N(0, I)``; ``g_b = g`` or, with
  ``--ip_noise_gamma_random_strength``, ``g u_b`` with ``u_b ~ U(0, 1)`` per sample) while the
  target keeps ``eps``, exactly like the DDPM objective (``library/training/noise.py``).
* the timestep the model is given is ``t = 1000 sigma`` (float; FLUX divides by 1000 again).
* ``--timestep_sampling`` (one draw of B values per step, see :meth:`FlowMatchingObjective.sample_sigmas`):
  ``uniform`` sigma ~ U(0, 1); ``sigmoid`` sigma = sigmoid(k n), n ~ N(0, 1), k = ``--sigmoid_scale``;
  ``shift`` that value shifted, ``s sigma / (1 + (s - 1) sigma)`` with s = ``--discrete_flow_shift``;
  ``flux_shift`` that value time-shifted, ``e^mu / (e^mu + (1/sigma - 1))`` with ``mu`` linear in
  the packed token count through (256, 0.5), (4096, 1.15); ``nextdit_shift`` (Lumina-Image 2.0) the
  same time shift of sigma ~ U(0, 1); ``sigma`` (default) u from the
  ``--weighting_scheme`` density (``logit_normal``: sigmoid(N(``--logit_mean``, ``--logit_std``));
  ``mode``: ``1 - u - m (cos^2(pi u / 2) - 1 + u)``, u ~ U(0,1), m = ``--mode_scale``; otherwise
  U(0, 1)), then ``i = floor(1000 u)`` (clamped to [0, 999]) indexes the 1000-entry table of
  ``FlowMatchEulerDiscreteScheduler(1000, shift=--discrete_flow_shift)``, whose sigmas are
  ``flow_shift(j / 1000, s)`` for j = 1000 .. 1 (so index 0 is sigma = 1, pure noise).
* ``--model_prediction_type`` (:meth:`FlowMatchingObjective.precondition`): ``raw`` pred = output;
  ``additive`` pred = output + x_t; ``sigma_scaled`` pred = x_t - sigma output (the x0 estimate when
  the output is a velocity), target x0, loss weight per sample from ``--weighting_scheme``:
  ``sigma_sqrt`` sigma^-2, ``cosmap`` 2 / (pi (1 - 2 sigma + 2 sigma^2)), otherwise 1.
* DDPM equivalent: the cumulative alpha with the same signal-to-noise ratio,
  ``abar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)``, i.e. ``snr = ((1 - sigma) / sigma)^2``, so
  the Huber ``snr`` schedule of ``library/training/loss.py`` can be used on flow models.

Randomness comes only from the global torch RNG on the training device (seeded by ``--seed``);
nothing here reads a device value back to the host.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from library.sampling.flow import flow_shift, flux_mu, flux_time_shift
from library.training.noise import input_perturbation

__all__ = ["FlowConfig", "FlowMatchingObjective", "FlowPrediction", "MODEL_PREDICTION_TYPES", "NUM_TRAIN_TIMESTEPS",
           "TIMESTEP_SAMPLINGS", "WEIGHTING_SCHEMES", "abar_equivalent", "loss_weighting", "sd3_sigmas",
           "timestep_density"]

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap", "none")

# sigma^-2 at sigma = 0 is inf and 0 * inf = NaN; floored here it stays finite (1e24 fits float32/bf16)
# while every sigma a float32 U(0,1) or t/1000 can take above 0 is left unchanged.
_SIGMA_FLOOR = 1e-12


@dataclass(frozen=True)
class FlowConfig:
    """The rectified-flow flags of one run (kohya names and defaults); validated on construction."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FlowConfig":
        """From parsed flags; absent flags (or ``None`` values) take the defaults above."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**values)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag for an unknown choice or an out-of-range value."""
        _choice("--timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _choice("--model_prediction_type", self.model_prediction_type, MODEL_PREDICTION_TYPES)
        _choice("--weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        if not self.sigmoid_scale > 0:
            raise ValueError(f"--sigmoid_scale must be > 0, got {self.sigmoid_scale}")
        if not self.discrete_flow_shift > 0:
            raise ValueError(f"--discrete_flow_shift must be > 0, got {self.discrete_flow_shift}")
        if not self.logit_std > 0:
            raise ValueError(f"--logit_std must be > 0, got {self.logit_std}")
        if self.ip_noise_gamma is not None and not self.ip_noise_gamma >= 0:
            raise ValueError(f"--ip_noise_gamma must be >= 0, got {self.ip_noise_gamma}")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


class FlowPrediction(NamedTuple):
    """What :meth:`FlowMatchingObjective.precondition` returns: compare ``pred`` with ``target``
    and multiply the per-sample loss by ``weighting`` [B] (None: all ones)."""

    pred: torch.Tensor
    target: torch.Tensor
    weighting: torch.Tensor | None


def timestep_density(weighting_scheme: str, batch_size: int, device: torch.device | str, *, logit_mean: float,
                     logit_std: float, mode_scale: float) -> torch.Tensor:
    """u [B] float32 from the ``--weighting_scheme`` density (module docstring); one global-RNG draw.

    diffusers' ``compute_density_for_timestep_sampling`` implements exactly these three densities
    (logit_normal: ``torch.normal`` then sigmoid; mode: ``torch.rand`` then the mode formula; any
    other scheme: ``torch.rand``).
    """
    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean=logit_mean,
                                              logit_std=logit_std, mode_scale=mode_scale, device=device)
    return u.float()


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weight [B] float32: sigma_sqrt ``sigma^-2``, cosmap ``2/(pi(1-2s+2s^2))``; else None (1).

    sigma is floored at 1e-12 first so sigma = 0 gives a large finite weight instead of inf (its
    loss is 0 with the x0 target, and 0 * inf would be NaN).
    """
    if weighting_scheme not in ("sigma_sqrt", "cosmap"):
        return None
    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float().clamp_min(_SIGMA_FLOOR)).float()


def abar_equivalent(sigmas: torch.Tensor) -> torch.Tensor:
    """``(1-s)^2 / ((1-s)^2 + s^2)``: the DDPM cumulative alpha with the SNR ``((1-s)/s)^2`` of sigma s."""
    signal = (1.0 - sigmas) ** 2
    return signal / (signal + sigmas**2)


class FlowMatchingObjective:
    """Rectified-flow noising, timestep sampling and output preconditioning (module docstring).

    A family's training step::

        noise = objective.sample_noise(latents)                               # 1st global-RNG draw
        sigmas, timesteps = objective.sample_sigmas(b, device, image_seq_len=n)  # 2nd
        noisy, _ = objective.noisy_and_target(latents, noise, sigmas)         # 3rd (ip_noise_gamma only)
        out = model(noisy, timesteps / 1000, ...)
        pred, target, weighting = objective.precondition(out, noisy, sigmas, latents, noise)
    """

    def __init__(self, config: FlowConfig | None = None):
        self.config = config or FlowConfig()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                                    shift=self.config.discrete_flow_shift)
        # The discrete table of the ``sigma`` sampling mode, built once (CPU) and copied to each device once.
        self._table_cpu = (scheduler.timesteps.float().clone(), scheduler.sigmas.float().clone())
        if self._table_cpu[0].shape[0] != NUM_TRAIN_TIMESTEPS or self._table_cpu[1].shape[0] != NUM_TRAIN_TIMESTEPS:
            raise RuntimeError("FlowMatchEulerDiscreteScheduler did not build a 1000-entry training table "
                               f"(timesteps {tuple(self._table_cpu[0].shape)}, sigmas {tuple(self._table_cpu[1].shape)})")
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- the discrete table ----------------------------------------------------------------------
    def table(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [1000], sigmas [1000])`` float32 of the scheduler, kept on ``device`` once moved.

        Index 0 is sigma = 1 (pure noise); ``timesteps == 1000 * sigmas``.
        """
        device = torch.device(device)
        # Keyed by the device as asked ("cuda" vs "cuda:0" are different keys but each is copied only once).
        if device not in self._tables:
            self._tables[device] = tuple(t.to(device) for t in self._table_cpu)  # type: ignore[assignment]
        return self._tables[device]

    # --- sampling ----------------------------------------------------------------------------------
    def sample_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """eps ~ N(0, I) like ``latents`` (the DDPM noise options do not apply to flow models)."""
        return torch.randn_like(latents)

    def sample_sigmas(self, batch_size: int, device: torch.device | str, *,
                      image_seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas [B], timesteps [B])`` float32 on ``device``, ``timesteps = 1000 sigmas``.

        Exactly one draw of ``batch_size`` values from the global torch RNG of ``device``:
        ``torch.rand`` (uniform, nextdit_shift; sigma mode with a uniform/mode density), ``torch.randn``
        (sigmoid/shift/flux_shift) or ``torch.normal`` (sigma mode with logit_normal).
        sigma lies in [0, 1) (``uniform``), (0, 1) (sigmoid family) or (0, 1] (``sigma``: the table
        starts at exactly 1). ``image_seq_len`` (packed token count ``(h/2)(w/2)``) is needed by
        ``flux_shift`` and ``nextdit_shift`` only.
        """
        cfg = self.config
        mode = cfg.timestep_sampling
        if mode == "sigma":
            u = timestep_density(cfg.weighting_scheme, batch_size, device, logit_mean=cfg.logit_mean,
                                 logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
            # floor(1000 u); clamped because u can be exactly 1 (mode density at u=0) or leave [0, 1]
            # (mode_scale > ~1.75 is not monotone), which would index out of range or wrap around.
            index = (u * NUM_TRAIN_TIMESTEPS).floor().long().clamp_(0, NUM_TRAIN_TIMESTEPS - 1)
            timesteps, sigmas = self.table(device)
            return sigmas[index], timesteps[index]
        if mode in ("uniform", "nextdit_shift"):
            sigmas = torch.rand(batch_size, device=device, dtype=torch.float32)
            if mode == "nextdit_shift":
                if image_seq_len is None:
                    raise ValueError("--timestep_sampling nextdit_shift needs the image token count (image_seq_len)")
                sigmas = flux_time_shift(flux_mu(image_seq_len), sigmas)
        else:
            sigmas = torch.sigmoid(cfg.sigmoid_scale * torch.randn(batch_size, device=device, dtype=torch.float32))
            if mode == "shift":
                sigmas = flow_shift(sigmas, cfg.discrete_flow_shift)
            elif mode == "flux_shift":
                if image_seq_len is None:
                    raise ValueError("--timestep_sampling flux_shift needs the image token count (image_seq_len)")
                sigmas = flux_time_shift(flux_mu(image_seq_len), sigmas)
        return sigmas, sigmas * NUM_TRAIN_TIMESTEPS

    @staticmethod
    def sigmas_from_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
        """Fixed timesteps (e.g. the validation loss's Long 200/400/600/800) -> sigma = t / 1000, float32."""
        return timesteps.float() / NUM_TRAIN_TIMESTEPS

    # --- noising and targets -----------------------------------------------------------------------
    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *,
                         perturb: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t = (1 - sigma) x0 + sigma eps'`` and the velocity target ``eps - x0``.

        ``eps' = eps + g_b xi`` with ``--ip_noise_gamma`` and ``perturb`` (draws ``u_b`` then ``xi``
        from the global RNG, as ``noise.input_perturbation`` does), else ``eps``. ``perturb=False``
        (the validation loss) draws nothing.
        """
        s = sigmas.to(device=latents.device, dtype=latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        input_noise = noise
        if perturb and self.config.ip_noise_gamma:
            input_noise = input_perturbation(noise, self.config.ip_noise_gamma,
                                             random_strength=self.config.ip_noise_gamma_random_strength)
        noisy = (1.0 - s) * latents + s * input_noise
        return noisy, noise - latents

    def precondition(self, model_output: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                     latents: torch.Tensor, noise: torch.Tensor) -> FlowPrediction:
        """Apply ``--model_prediction_type`` and return what the loss compares, with its weighting.

        * ``raw``: pred = output, target = eps - x0, weighting None.
        * ``additive``: pred = output + x_t, target = eps - x0, weighting None.
        * ``sigma_scaled``: pred = x_t - sigma output, target = x0, weighting = :func:`loss_weighting`
          of ``--weighting_scheme`` (None for uniform/none/logit_normal/mode, which only shape
          the timestep density).

        Deliberate fix (sigma_scaled): pred is an x0 estimate (it equals x0 exactly when the output
        is the true velocity eps - x0), so it is compared with x0 here, as SD3 training does. The
        kohya FLUX trainer compares this x0 estimate with the velocity ``eps - x0`` instead, which
        makes the optimum ``output = (x_t - eps + x0) / sigma`` rather than the velocity; a LoRA
        trained our way therefore differs from one trained by kohya with this (default) setting.
        """
        kind = self.config.model_prediction_type
        velocity = noise - latents
        if kind == "raw":
            return FlowPrediction(model_output, velocity, None)
        if kind == "additive":
            return FlowPrediction(model_output + noisy, velocity, None)
        s = sigmas.to(device=noisy.device, dtype=noisy.dtype).view(-1, *([1] * (noisy.ndim - 1)))
        return FlowPrediction(noisy - s * model_output, latents, loss_weighting(self.config.weighting_scheme, sigmas))

    @staticmethod
    def abar_equivalent(sigmas: torch.Tensor) -> torch.Tensor:
        """See :func:`abar_equivalent` (for the Huber ``snr`` schedule)."""
        return abar_equivalent(sigmas)


def sd3_sigmas(batch_size: int, device: torch.device | str, *, weighting_scheme: str, logit_mean: float,
               logit_std: float, mode_scale: float, training_shift: float, min_timestep: int | None = 0,
               max_timestep: int | None = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 / SD3.5 timesteps (kohya_surface.md §7.4): ``(sigmas [B], timesteps [B])`` float32.

    u from the ``--weighting_scheme`` density (:func:`timestep_density`, one global-RNG draw), then
    ``u' = s u / (1 + (s - 1) u)`` (s = ``--training_shift``), clamped to [0, 1];
    ``t = floor(u' (t_max - t_min) + t_min)`` (integer-valued, in [t_min, t_max]) and
    ``sigma = t / 1000``. ``min_timestep``/``max_timestep`` None mean 0/1000.
    """
    t_min = 0 if min_timestep is None else int(min_timestep)
    t_max = NUM_TRAIN_TIMESTEPS if max_timestep is None else int(max_timestep)
    if not 0 <= t_min <= t_max <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"--min_timestep/--max_timestep must satisfy 0 <= min <= max <= {NUM_TRAIN_TIMESTEPS}, "
                         f"got {t_min}/{t_max}")
    if not training_shift > 0:
        raise ValueError(f"--training_shift must be > 0, got {training_shift}")
    _choice("--weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    u = timestep_density(weighting_scheme, batch_size, device, logit_mean=logit_mean, logit_std=logit_std,
                         mode_scale=mode_scale)
    u = flow_shift(u, training_shift).clamp(0.0, 1.0)
    timesteps = (u * (t_max - t_min) + t_min).floor()
    return timesteps / NUM_TRAIN_TIMESTEPS, timesteps
