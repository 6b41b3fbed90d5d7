"""How a ControlNet feeds the U-Net: the residuals of a training step, and the U-Net of a preview image.

The U-Net families call ``models.extra["unet_control"]`` when it is set
(:meth:`library.families.sd.family.StableDiffusionFamily.call_unet` and ``sample_image``); a ControlNet
target puts a :class:`UNetControl` there. Contract of that object:

* ``step_kwargs(noisy, timesteps, context, unet_kwargs, batch) -> dict``: more U-Net keyword arguments
  for one training/validation call; here ``down_block_additional_residuals`` and
  ``mid_block_additional_residual`` computed from ``batch["conditioning_images"]`` (float [B,3,H,W] in
  [0, 1]) with the step's noisy latents, timesteps and text (SDXL: and its ``added_cond_kwargs``);
* ``preview(unet, prompt, device, dtype) -> (unet_callable, prompt)``: what a preview sampler calls instead
  of the U-Net for one :class:`~library.sampling.prompts.SamplePrompt` (``--cn`` / ``controlnet_image``),
  and the prompt to hand to the sampler.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from library.data.errors import DatasetError

logger = logging.getLogger(__name__)


def load_control_image(path: str | Path, width: int, height: int) -> torch.Tensor:
    """A preview's control image as float32 [1,3,height,width] in [0, 1] (resized to the image size)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    except Exception as e:  # a missing or broken file names itself
        raise DatasetError(f"ControlNet image {path} (--cn / controlnet_image of the sample prompts) cannot be "
                           f"read: {e}") from e
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def controlnet_residuals(controlnet: nn.Module, noisy: torch.Tensor, timesteps, context: torch.Tensor,
                         control_image: torch.Tensor, *, added_cond_kwargs: dict | None = None,
                         scale: float = 1.0) -> dict[str, Any]:
    """The U-Net keyword arguments carrying ``controlnet``'s residuals for one call (cast to ``noisy``'s dtype)."""
    image = control_image.to(device=noisy.device, dtype=noisy.dtype)
    if image.shape[0] != noisy.shape[0]:  # one control image for a CFG batch (uncond + cond)
        image = image.expand(noisy.shape[0], -1, -1, -1)
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=image,
                           conditioning_scale=scale, added_cond_kwargs=added_cond_kwargs, return_dict=False)
    return {"down_block_additional_residuals": [d.to(noisy.dtype) for d in down],
            "mid_block_additional_residual": mid.to(noisy.dtype)}


class ControlledUNet:
    """A U-Net callable with the diffusers calling convention whose every call adds ``controlnet``'s
    residuals for a fixed control image (what a preview sampler runs)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, control_image: torch.Tensor, scale: float = 1.0):
        self.unet, self.controlnet, self.control_image, self.scale = unet, controlnet, control_image, scale

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        residuals = controlnet_residuals(self.controlnet, sample, timestep, encoder_hidden_states, self.control_image,
                                         added_cond_kwargs=added_cond_kwargs, scale=self.scale)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added_cond_kwargs, **residuals, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


class UNetControl:
    """The ``models.extra["unet_control"]`` of a ControlNet run (see the module docstring)."""

    def __init__(self, controlnet: nn.Module):
        #: what training and validation steps call: the accelerate-prepared module once the target has it
        self.controlnet = controlnet
        #: the bare model, for previews
        self.model = controlnet
        self._warned_no_image = False

    def step_kwargs(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, unet_kwargs: dict,
                    batch: dict) -> dict[str, Any]:
        images = batch.get("conditioning_images")
        if images is None:
            raise DatasetError("a batch without conditioning_images reached the ControlNet: every subset needs "
                               "conditioning_data_dir (a --dataset_class must put conditioning_images in its batches)")
        return controlnet_residuals(self.controlnet, noisy, timesteps, context, images,
                                    added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"))

    def preview(self, unet, prompt, device, dtype):
        if not prompt.controlnet_image:
            if not self._warned_no_image:
                logger.warning("%s: no --cn / controlnet_image: preview drawn without the ControlNet",
                               prompt.source or "sample prompt")
                self._warned_no_image = True
            return unet, prompt
        image = load_control_image(prompt.controlnet_image, prompt.width, prompt.height).to(device)
        return ControlledUNet(unet, self.model, image), dataclasses.replace(prompt, controlnet_image=None)
