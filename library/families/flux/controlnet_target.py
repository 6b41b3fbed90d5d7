"""FLUX ControlNet training: the :class:`~library.training.targets.TrainingTarget` of ``flux_train_control_net.py``.

The shared loop runs :class:`~library.families.flux.family.FluxFamily` with this target. As the SD
ControlNet target (:class:`library.controlnet.target.ControlNetTarget`, whose flag checks, accelerate
plumbing and metadata it reuses), the DiT, text encoders and AE stay frozen and the dataset is a
ControlNet dataset (``conditioning_images`` in every batch); what differs:

* the trained model is a :class:`~library.families.flux.controlnet.ControlNetFlux`: new from the DiT
  (``--controlnet_depth`` double / ``--controlnet_single_depth`` single blocks copied, default 2 / 0)
  or loaded from ``--controlnet_model_name_or_path`` (depths from the file);
* the family reaches it through ``models.extra["flux_control"]`` (a :class:`FluxControl`): in
  training and validation steps (``FluxFamily.predict``) and previews (``--cn`` images);
* it is kept in float32 under mixed precision (its weights are trained, as in a fine-tune);
* saved as one ``.safetensors`` file in the reference's ControlNet layout with the run's metadata
  (``modelspec.architecture`` ``flux-1-dev/controlnet``), or ``.ckpt``/``.pt`` (``torch.save``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.args import ArgumentError
from library.controlnet.target import ControlNetTarget, controlnet_metadata
from library.data.errors import DatasetError
from library.families.base import FamilyModels, ModelFamily

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("safetensors", "ckpt", "pt")


class FluxControl:
    """The ``models.extra["flux_control"]`` of a FLUX ControlNet run.

    * ``step_kwargs(img, img_ids, txt, txt_ids, timesteps, y, guidance, mask, batch) -> dict``: the
      ``Flux.forward`` keyword arguments carrying the ControlNet's residuals for one training or
      validation call (the step's DiT inputs, ``batch["conditioning_images"]`` float [B,3,H,W] in [0, 1]);
    * ``preview(prompt, width, height) -> (control image [1,3,H,W] or None, prompt)`` for a preview's
      ``--cn`` image.
    """

    def __init__(self, controlnet: nn.Module):
        #: what training steps call: the accelerate-prepared module once the target has it
        self.controlnet = controlnet
        #: the bare model, for previews
        self.model = controlnet
        self._warned_no_image = False

    def step_kwargs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, mask, batch: dict) -> dict[str, Any]:
        images = batch.get("conditioning_images")
        if images is None:
            raise DatasetError("a batch without conditioning_images reached the FLUX ControlNet: every subset needs "
                               "conditioning_data_dir (a --dataset_class must put conditioning_images in its batches)")
        from library.families.flux.controlnet import residual_kwargs

        return residual_kwargs(self.controlnet, img, img_ids, images, txt, txt_ids, timesteps, y, guidance, mask)

    def preview(self, prompt):
        from library.controlnet.control import load_control_image

        if not prompt.controlnet_image:
            if not self._warned_no_image:
                logger.warning("%s: no --cn / controlnet_image: preview drawn without the ControlNet",
                               prompt.source or "sample prompt")
                self._warned_no_image = True
            return None, prompt
        image = load_control_image(prompt.controlnet_image, prompt.width, prompt.height)
        return image, dataclasses.replace(prompt, controlnet_image=None)


class FluxControlNetTarget(ControlNetTarget):
    """A :class:`~library.families.flux.controlnet.ControlNetFlux` on the frozen FLUX.1 DiT."""

    tracker_name = "flux_control_net_train"

    def validate_args(self, args) -> None:
        fmt = getattr(args, "save_model_as", None) or "safetensors"
        if fmt not in SAVE_FORMATS:
            raise ArgumentError(f"--save_model_as {fmt}: a FLUX ControlNet is saved as safetensors, ckpt or pt")
        super().validate_args(args)
        depth, single = getattr(args, "controlnet_depth", 2), getattr(args, "controlnet_single_depth", 0)
        if depth < 0 or single < 0 or depth + single == 0:
            raise ArgumentError(f"--controlnet_depth {depth} / --controlnet_single_depth {single}: the ControlNet "
                                "needs at least one block (and no negative counts)")

    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        from library.families.flux.controlnet import ControlNetFlux, load_flux_controlnet

        flux = models.denoiser
        source = getattr(args, "controlnet_model_name_or_path", None)
        if source:
            self.controlnet = load_flux_controlnet(source, flux)
        else:
            depth, single = args.controlnet_depth, args.controlnet_single_depth
            if depth > flux.config.depth or single > flux.config.depth_single_blocks:
                raise ArgumentError(f"--controlnet_depth {depth} / --controlnet_single_depth {single}: the DiT has "
                                    f"only {flux.config.depth} double and {flux.config.depth_single_blocks} single "
                                    "blocks")
            self.controlnet = ControlNetFlux.from_flux(flux, depth, single)
            logger.info("new FLUX ControlNet from the DiT: %d double + %d single blocks (%.1fM parameters)", depth,
                        single, sum(p.numel() for p in self.controlnet.parameters()) / 1e6)
        self.prepared = self.controlnet
        self.control = FluxControl(self.controlnet)
        models.extra["flux_control"] = self.control

    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        controlnet = self.controlnet
        # float32 under mixed precision: its weights are trained (autocast computes in the mixed dtype)
        controlnet.to(device=models.denoiser.img_in.weight.device, dtype=torch.float32)
        if args.gradient_checkpointing:
            offload = bool(getattr(args, "cpu_offload_checkpointing", False))
            controlnet.enable_gradient_checkpointing(cpu_offload=offload)
        controlnet.requires_grad_(True)
        controlnet.train()

    def save(self, path: Path, dtype, metadata, *, epoch: int, step: int) -> None:
        from library.io_utils import save_safetensors, save_torch

        state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu()
                 .contiguous() for k, v in self.controlnet.state_dict().items()}
        if self.save_format == "safetensors":
            save_safetensors(state, path, controlnet_metadata(metadata) or None)
        else:
            save_torch(state, path)
