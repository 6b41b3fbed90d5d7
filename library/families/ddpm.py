"""The DDPM training objective of the U-Net families (SD 1.x/2.x, SDXL).

Noise schedule: 1000 steps, scaled-linear betas 0.00085 -> 0.012, as the models were trained.
A step draws one timestep per sample uniformly, adds noise to the latents, and the target is the
noise (epsilon prediction) or the velocity (``--v_parameterization``).

The noise/timestep flags (noise offset, pyramid noise, input perturbation, zero terminal SNR,
timestep bounds) come in as a :class:`library.training.noise.NoiseConfig`; the formulas are in
``library/training/noise.py``.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from library.training.noise import (NoiseConfig, input_perturbation, make_noise, sample_timesteps, timestep_bounds,
                                    zero_terminal_snr_betas)


def make_noise_scheduler(zero_terminal_snr: bool = False) -> DDPMScheduler:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(scheduler.betas).float().numpy()
        scheduler = DDPMScheduler(num_train_timesteps=1000, trained_betas=betas, clip_sample=False)
    return scheduler


class DDPMObjective:
    def __init__(self, v_parameterization: bool, num_timesteps: int = 1000, noise: NoiseConfig | None = None):
        self.noise = noise or NoiseConfig()
        self.scheduler = make_noise_scheduler(self.noise.zero_terminal_snr)
        self.v_parameterization = v_parameterization
        self.num_timesteps = num_timesteps
        self.timestep_low, self.timestep_high = timestep_bounds(self.noise, num_timesteps)
        self._alphas_cumprod: torch.Tensor | None = None

    def _abar(self, device: torch.device) -> torch.Tensor:
        # Kept on the device once instead of copied from the scheduler every step.
        if self._alphas_cumprod is None or self._alphas_cumprod.device != device:
            self._alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._alphas_cumprod

    def alphas_cumprod(self, device: torch.device) -> torch.Tensor:
        """The whole ``abar`` table [num_timesteps] (float32) on ``device``, kept there (for the loss)."""
        return self._abar(device)

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Uniform in ``[--min_timestep, --max_timestep)`` (default ``[0, 1000)``)."""
        return sample_timesteps(batch_size, self.timestep_low, self.timestep_high, device)

    def sample_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """The training noise: N(0, I) with ``--noise_offset``/``--multires_noise_*`` applied."""
        return make_noise(latents, self.noise)

    def noisy_latents_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                                 perturb: bool = True):
        """x_t = sqrt(abar) x0 + sqrt(1-abar) eps; target eps, or v = sqrt(abar) eps - sqrt(1-abar) x0.

        With ``--ip_noise_gamma`` (and ``perturb``), x_t uses ``eps + gamma * xi`` instead of eps
        while the target keeps eps.
        """
        abar = self._abar(latents.device)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
        sqrt_a, sqrt_1ma = abar.sqrt(), (1 - abar).sqrt()
        input_noise = noise
        if perturb and self.noise.ip_noise_gamma:
            input_noise = input_perturbation(noise, self.noise.ip_noise_gamma,
                                             random_strength=self.noise.ip_noise_gamma_random_strength)
        noisy = sqrt_a * latents + sqrt_1ma * input_noise
        target = sqrt_a * noise - sqrt_1ma * latents if self.v_parameterization else noise
        return noisy, target
