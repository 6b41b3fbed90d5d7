"""The training loss: loss type, masks, per-sample weights and the SNR-based weightings.

Order of one batch's loss (``d = pred - target``, element-wise, B samples):

1. element loss by ``--loss_type``:
   ``l2``: ``d**2``; ``l1``: ``|d|``; ``huber``: ``2 c (sqrt(d**2 + c**2) - c)``;
   ``smooth_l1``: ``2 (sqrt(d**2 + c**2) - c)`` (pseudo-Huber forms, smooth at 0), with a
   per-sample ``c_b`` from ``--huber_schedule`` (t = timestep, ``abar`` = cumulative alpha):

   - ``constant``: ``c_b = huber_c * huber_scale``
   - ``exponential``: ``c_b = exp(-a t) * huber_scale`` with ``a = -ln(huber_c) / 1000``
     (so c goes from 1 at t = 0 to huber_c at t = 1000)
   - ``snr``: ``c_b = ((1 - huber_c) / (1 + sigma)**2 + huber_c) * huber_scale`` with
     ``sigma = sqrt((1 - abar) / abar)`` (c near 1 at low noise, near huber_c at high noise)
2. mask: the element loss is multiplied by the batch's ``alpha_masks`` ([B,H,W] in [0,1]),
   area-resized to the latent size; masked-out pixels add 0 (the mean below still divides by
   all pixels, so a half-masked image contributes about half the loss, as in the reference).
3. mean over all non-batch dims -> ``[B]``; times the batch's ``loss_weights`` (prior loss weight).
4. SNR weightings, ``snr = abar / (1 - abar)`` at each sample's timestep:

   - ``--min_snr_gamma g``: ``* min(snr, g) / snr`` (eps) or ``* min(snr, g) / (snr + 1)`` (v-pred)
   - ``--scale_v_pred_loss_like_noise_pred``: ``* s / (s + 1)`` with ``s = min(snr, 1000)``
   - ``--v_pred_like_loss w``: ``+ w * loss * (s + 1) / s`` (s as above, floored at 1e-3)
   - ``--debiased_estimation_loss``: ``* 1 / sqrt(s)`` (eps) or ``* 1 / (s + 1)`` (v-pred),
     s = ``min(snr, 1000)`` floored at 1e-3 so a zero-terminal-SNR timestep stays finite
5. mean over the batch.

The eps form of min-SNR is evaluated as ``min(g / snr, 1)``, which equals ``min(snr, g) / snr``
and is 1 (not NaN) at snr = 0 (zero terminal SNR).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0
SNR_FLOOR = 1e-3


@dataclass(frozen=True)
class LossConfig:
    """The loss flags of one run; built once with :meth:`from_args`."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False
    num_timesteps: int = 1000

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LossConfig":
        names = [n for n in cls.__dataclass_fields__ if n != "num_timesteps"]
        return cls(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})

    @property
    def needs_snr(self) -> bool:
        """Whether the loss needs ``abar`` at the sampled timesteps."""
        return bool(self.min_snr_gamma or self.scale_v_pred_loss_like_noise_pred or self.v_pred_like_loss
                    or self.debiased_estimation_loss or (self.loss_type in ("huber", "smooth_l1")
                                                         and self.huber_schedule == "snr"))


def huber_c(config: LossConfig, timesteps: torch.Tensor, abar_t: torch.Tensor | None) -> torch.Tensor:
    """Per-sample Huber ``c`` ``[B]`` (float32) for ``config.huber_schedule``."""
    if config.huber_schedule == "constant":
        return torch.full(timesteps.shape, config.huber_c * config.huber_scale, device=timesteps.device)
    if config.huber_schedule == "exponential":
        a = -math.log(config.huber_c) / config.num_timesteps
        return torch.exp(-a * timesteps.float()) * config.huber_scale
    if config.huber_schedule == "snr":
        if abar_t is None:
            raise ValueError("--huber_schedule snr needs the noise schedule (alphas_cumprod) of the model family")
        sigma = ((1.0 - abar_t) / abar_t).sqrt()  # abar 0 -> sigma inf -> c = huber_c
        return ((1.0 - config.huber_c) / (1.0 + sigma) ** 2 + config.huber_c) * config.huber_scale
    raise ValueError(f"--huber_schedule {config.huber_schedule!r}: use one of {', '.join(HUBER_SCHEDULES)}")


def element_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise loss (same shape as ``pred``); ``c`` is ``[B]`` for huber / smooth_l1."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        c = c.view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"--loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")


def apply_mask(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``loss [B,C,h,w] * masks [B,H,W]`` area-resized to ``(h, w)`` (broadcast over channels)."""
    m = masks.to(device=loss.device, dtype=loss.dtype).unsqueeze(1)
    if m.shape[-2:] != loss.shape[-2:]:
        m = F.interpolate(m, size=loss.shape[-2:], mode="area")
    return loss * m


def snr_weighting(loss: torch.Tensor, snr: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Step 4 of the module docstring on per-sample losses ``[B]`` with ``snr`` ``[B]``."""
    if config.min_snr_gamma:
        gamma = config.min_snr_gamma
        if config.v_parameterization:
            loss = loss * torch.clamp(snr, max=gamma) / (snr + 1)
        else:
            loss = loss * torch.clamp(gamma / snr, max=1.0)
    capped = snr.clamp(min=SNR_FLOOR, max=SNR_CAP)
    if config.scale_v_pred_loss_like_noise_pred:
        loss = loss * capped / (capped + 1)
    if config.v_pred_like_loss:
        loss = loss + config.v_pred_like_loss * loss * (capped + 1) / capped
    if config.debiased_estimation_loss:
        loss = loss * (1.0 / (capped + 1) if config.v_parameterization else capped.rsqrt())
    return loss


def training_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, config: LossConfig, *,
                  loss_weights: torch.Tensor, alphas_cumprod: torch.Tensor | None = None,
                  masks: torch.Tensor | None = None, abar_t: torch.Tensor | None = None,
                  weighting: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar loss of a batch (steps 1-5 of the module docstring), in float32.

    ``alphas_cumprod`` is the family's whole ``abar`` table already on the loss device (indexed,
    never copied). Families without one (flow matching) may pass the per-sample ``abar_t`` of the
    same signal-to-noise ratio instead (for the Huber ``snr`` schedule; the SNR weightings of step
    4 are DDPM-only and refused by those families). ``weighting`` [B] multiplies the per-sample
    losses after step 3 (flow matching's ``--weighting_scheme``).
    """
    pred, target = pred.float(), target.float()
    if abar_t is not None:
        abar_t = abar_t.to(pred.device).float()
    elif alphas_cumprod is not None and config.needs_snr:
        abar_t = alphas_cumprod[timesteps.to(alphas_cumprod.device)].to(pred.device).float()
    c = huber_c(config, timesteps.to(pred.device), abar_t) if config.loss_type in ("huber", "smooth_l1") else None
    loss = element_loss(pred, target, config.loss_type, c)
    if masks is not None:
        loss = apply_mask(loss, masks)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    if weighting is not None:
        loss = loss * weighting.to(device=loss.device, dtype=loss.dtype)
    if config.needs_snr and (config.min_snr_gamma or config.scale_v_pred_loss_like_noise_pred
                             or config.v_pred_like_loss or config.debiased_estimation_loss):
        if abar_t is None:
            raise ValueError("SNR loss weightings (--min_snr_gamma, --debiased_estimation_loss, ...) need a "
                             "DDPM model family (one with alphas_cumprod)")
        loss = snr_weighting(loss, abar_t / (1.0 - abar_t), config)
    return loss.mean()


def prediction_loss(prediction, config: LossConfig, *, loss_weights: torch.Tensor,
                    masks: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`training_loss` of a family's :class:`~library.families.base.Prediction` (what the
    trainer and the validation loss both call, so the two cannot drift apart)."""
    return training_loss(prediction.pred, prediction.target, prediction.timesteps, config, loss_weights=loss_weights,
                         alphas_cumprod=prediction.alphas_cumprod, masks=masks, abar_t=prediction.abar_t,
                         weighting=prediction.weighting)
