"""ControlNet training: the :class:`~library.training.targets.TrainingTarget` of the ControlNet scripts.

``train_control_net.py`` (SD 1.x/2.x) and ``sdxl_train_control_net.py`` run the shared loop
(:class:`library.training.trainer.Trainer`) with the family of their model and this target. What it
does differently from the other targets:

* the U-Net, text encoders and VAE stay frozen; a ``ControlNetModel`` is trained: new from the U-Net
  (``ControlNetModel.from_unet``: its encoder copied, zero convolutions) or loaded from
  ``--controlnet_model_name_or_path`` (:func:`library.controlnet.loading.load_controlnet`);
* the dataset is a ControlNet dataset (``needs_conditioning_images``): every image has a conditioning
  image, and batches carry ``conditioning_images``;
* the family's U-Net call gets the ControlNet's residuals through ``models.extra["unet_control"]``
  (:class:`library.controlnet.control.UNetControl`), in training, validation and previews (``--cn``);
* learning rates: SD ``--learning_rate`` for the whole ControlNet; SDXL ``--control_net_lr`` (default
  1e-4) for the ControlNet's own layers (``controlnet_*``: conditioning embedding, zero convolutions) and
  ``--learning_rate`` for its copy of the U-Net encoder, as the reference's SDXL script does. Groups are
  logged as ``lr/controlnet`` (and ``lr/controlnet_unet``);
* saved with :func:`library.controlnet.saving.save_controlnet` in ``--save_model_as`` (``safetensors``
  default, ``ckpt``/``pt``, ``diffusers``): the Diffusers ``ControlNetModel`` layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from library.args import ArgumentError
from library.controlnet.args import check_conditioning_data_dir
from library.families.base import FamilyModels, ModelFamily
from library.training.targets import TrainingTarget

logger = logging.getLogger(__name__)

#: the keys of the training record that describe a LoRA network, not a ControlNet
_NETWORK_KEYS = ("ss_network_", "ss_unet_lr", "ss_text_encoder_lr", "ss_scale_weight_norms")


def controlnet_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata of a saved ControlNet from the run's: ``modelspec.architecture`` ``<base>/controlnet``
    (as the reference writes for SDXL ControlNets), title ``ControlNet@...`` by default, no LoRA keys."""
    out = {k: v for k, v in metadata.items() if not k.startswith(_NETWORK_KEYS)}
    architecture = out.get("modelspec.architecture")
    if architecture:
        out["modelspec.architecture"] = architecture.removesuffix("/lora") + "/controlnet"
    if out.get("modelspec.title", "").startswith("LoRA@"):
        out["modelspec.title"] = "ControlNet@" + out["modelspec.title"][len("LoRA@"):]
    return out


def check_sample_control_images(args) -> None:
    """Every ``--cn`` / ``controlnet_image`` of ``--sample_prompts`` exists: a typo fails now, not at the
    first preview."""
    if not getattr(args, "sample_prompts", None):
        return
    from library.sampling.prompts import load_prompts

    for prompt in load_prompts(args.sample_prompts):
        if prompt.controlnet_image and not os.path.isfile(prompt.controlnet_image):
            raise ArgumentError(f"{prompt.source}: ControlNet image {prompt.controlnet_image} (--cn) does not exist")


class ControlNetTarget(TrainingTarget):
    """A ControlNet on the frozen U-Net of an SD 1.x/2.x model (``train_control_net.py``)."""

    needs_conditioning_images = True
    tracker_name = "controlnet_train"

    def __init__(self) -> None:
        self.controlnet: nn.Module | None = None  # the bare model (saved, sampled)
        self.prepared: nn.Module | None = None  # what accelerate returned (called in training steps)
        self.control = None
        self.save_format = "safetensors"

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        self.save_format = args.save_model_as = args.save_model_as or "safetensors"  # the save policy names files
        source = getattr(args, "controlnet_model_name_or_path", None)
        if source and not os.path.exists(source):
            raise ArgumentError(f"--controlnet_model_name_or_path {source}: no such file or folder (a Diffusers "
                                "ControlNet folder or a .safetensors/.ckpt ControlNet file)")
        check_conditioning_data_dir(args)
        check_sample_control_images(args)
        # Read by the shared checks: the text encoders are frozen, so their outputs may be cached.
        args.network_train_unet_only = True
        args.log_tracker_name = args.log_tracker_name or self.tracker_name

    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        from library.controlnet.control import UNetControl
        from library.controlnet.loading import controlnet_from_unet, load_controlnet

        source = getattr(args, "controlnet_model_name_or_path", None)
        if source:
            self.controlnet = load_controlnet(source, models.denoiser)
        else:
            self.controlnet = controlnet_from_unet(models.denoiser)
            logger.info("new ControlNet from the U-Net (%.1fM parameters)",
                        sum(p.numel() for p in self.controlnet.parameters()) / 1e6)
        self.prepared = self.controlnet
        self.control = UNetControl(self.controlnet)
        models.extra["unet_control"] = self.control

    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        controlnet = self.controlnet
        controlnet.to(next(models.denoiser.parameters()).device)
        if args.xformers:
            controlnet.enable_xformers_memory_efficient_attention()
        if args.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        controlnet.requires_grad_(True)
        controlnet.train()

    # --- optimizer -----------------------------------------------------------------------------
    def optimizer_params(self, args):
        return [{"params": list(self.controlnet.parameters()), "lr": args.learning_rate}], ["controlnet"]

    # --- accelerate ----------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.prepared]

    def set_prepared(self, prepared: list[nn.Module], accelerator) -> None:
        self.prepared = prepared[0]
        self.controlnet = accelerator.unwrap_model(self.prepared)
        self.control.controlnet = self.prepared  # training steps go through the wrapper (DDP gradient sync)
        self.control.model = self.controlnet

    def cast_for_full_precision(self, dtype: torch.dtype) -> None:
        self.controlnet.to(dtype)

    def trainable_parameters(self):
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    # --- saving --------------------------------------------------------------------------------
    def save(self, path: Path, dtype, metadata, *, epoch: int, step: int) -> None:
        from library.controlnet.saving import save_controlnet

        save_controlnet(self.controlnet, path, fmt=self.save_format, dtype=dtype,
                        metadata=controlnet_metadata(metadata))


class SDXLControlNetTarget(ControlNetTarget):
    """``sdxl_train_control_net.py``: ``--control_net_lr`` for the ControlNet's own layers."""

    tracker_name = "sdxl_control_net_train"

    def optimizer_params(self, args):
        own, copied = [], []
        for name, param in self.controlnet.named_parameters():
            (own if name.startswith("controlnet_") else copied).append(param)
        control_lr = getattr(args, "control_net_lr", None)
        groups = [{"params": own, "lr": args.learning_rate if control_lr is None else control_lr},
                  {"params": copied, "lr": args.learning_rate}]
        return groups, ["controlnet", "controlnet_unet"]
