"""The DDPM training objective of the U-Net families (SD 1.x/2.x, SDXL).

Noise schedule: 1000 steps, scaled-linear betas 0.00085 -> 0.012, as the models were trained.
A step draws one timestep per sample uniformly, adds noise to the latents, and the target is the
noise (epsilon prediction) or the velocity (``--v_parameterization``).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def make_noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False)


class DDPMObjective:
    def __init__(self, v_parameterization: bool, num_timesteps: int = 1000):
        self.scheduler = make_noise_scheduler()
        self.v_parameterization = v_parameterization
        self.num_timesteps = num_timesteps
        self._alphas_cumprod: torch.Tensor | None = None

    def _abar(self, device: torch.device) -> torch.Tensor:
        # Kept on the device once instead of copied from the scheduler every step.
        if self._alphas_cumprod is None or self._alphas_cumprod.device != device:
            self._alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._alphas_cumprod

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, dtype=torch.long)

    def noisy_latents_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = sqrt(abar) x0 + sqrt(1-abar) eps; target eps, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
        abar = self._abar(latents.device)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
        sqrt_a, sqrt_1ma = abar.sqrt(), (1 - abar).sqrt()
        noisy = sqrt_a * latents + sqrt_1ma * noise
        target = sqrt_a * noise - sqrt_1ma * latents if self.v_parameterization else noise
        return noisy, target
