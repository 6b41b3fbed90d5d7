"""ControlNet-LLLite training: the :class:`~library.training.targets.TrainingTarget` of
``sdxl_train_control_net_lllite.py``.

The shared loop (:class:`library.training.trainer.Trainer`) runs with :class:`SDXLFamily` and
:class:`LLLiteTarget`:

* the U-Net, both text encoders and the VAE stay frozen; a :class:`networks.control_net_lllite.ControlNetLLLite`
  is created (``--cond_emb_dim``, ``--network_dim`` = its ``mlp_dim``, ``--network_dropout``) or
  loaded from ``--network_weights`` (dims from the file), and hooked into the U-Net;
* the dataset is a ControlNet dataset (``needs_conditioning_images``): batches carry
  ``conditioning_images`` float32 [B,3,H,W] in [0, 1], cropped and flipped as their images;
* the family's U-Net call reaches the network through ``models.extra["unet_control"]`` (the contract
  of :mod:`library.controlnet.control`): :class:`LLLiteControl` embeds each step's conditioning images
  before the U-Net runs (with gradients in training), and sets a preview's ``--cn`` image;
* learning rate: ``--control_net_lr`` when given, else ``--learning_rate`` (what the reference's LLLite
  trainer uses); one group, logged as ``lr/lllite``;
* saved as the LLLite file format (``lllite_unet_*`` keys, see the network module) with the run's
  ``ss_*`` record and ``modelspec.architecture`` = ``stable-diffusion-xl-v1-base/control-net-lllite``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from library.args import ArgumentError
from library.controlnet.args import check_conditioning_data_dir
from library.families.base import FamilyModels, ModelFamily
from library.training.targets import SingleNetworkTarget

logger = logging.getLogger(__name__)

__all__ = ["LLLiteControl", "LLLiteTarget", "lllite_metadata"]

ARCHITECTURE = "stable-diffusion-xl-v1-base/control-net-lllite"
#: the keys of the training record that describe a LoRA network (module, alpha, args), not LLLite
_LORA_KEYS = ("ss_network_module", "ss_network_alpha", "ss_network_args", "ss_unet_lr", "ss_text_encoder_lr",
              "ss_scale_weight_norms")
#: the U-Net levels of SDXL shrink the image 32 times at the deepest one the network embeds for
SIZE_MULTIPLE = 32


def lllite_metadata(metadata: dict[str, str], network) -> dict[str, str]:
    """A saved network's metadata: the run's record without the LoRA-only keys, its dims, the
    LLLite ``modelspec.architecture`` (and ``LLLite@...`` as the default title)."""
    out = {k: v for k, v in metadata.items() if not k.startswith(_LORA_KEYS)}
    if "ss_network_dim" in out or "ss_training_started_at" in out:
        out["ss_network_dim"] = str(network.mlp_dim)
        out["ss_cond_emb_dim"] = str(network.cond_emb_dim)
    if "modelspec.architecture" in out:
        out["modelspec.architecture"] = ARCHITECTURE
    if out.get("modelspec.title", "").startswith("LoRA@"):
        out["modelspec.title"] = "LLLite@" + out["modelspec.title"][len("LoRA@"):]
    return out


class LLLiteControl:
    """The ``models.extra["unet_control"]`` of an LLLite run (contract in :mod:`library.controlnet.control`).

    The network's modules sit inside the U-Net's layers, so the U-Net call needs no extra arguments:
    :meth:`step_kwargs` only embeds the batch's conditioning images first.
    """

    def __init__(self, network) -> None:
        self.network = network
        self._warned_no_image = False

    def step_kwargs(self, noisy: torch.Tensor, timesteps, context, unet_kwargs: dict, batch: dict) -> dict:
        images = batch.get("conditioning_images")
        if images is None:
            from library.data.errors import DatasetError

            raise DatasetError("a batch without conditioning_images reached ControlNet-LLLite: every subset needs "
                               "conditioning_data_dir (a --dataset_class must put conditioning_images in its batches)")
        self.network.set_cond_image(images.to(noisy.device))
        return {}

    def preview(self, unet, prompt, device, dtype):
        if not prompt.controlnet_image:
            if not self._warned_no_image:
                logger.warning("%s: no --cn / controlnet_image: preview drawn without ControlNet-LLLite",
                               prompt.source or "sample prompt")
                self._warned_no_image = True
            self.network.set_cond_image(None)
            return unet, prompt
        from library.controlnet.control import load_control_image

        image = load_control_image(prompt.controlnet_image, prompt.width, prompt.height).to(device)
        with torch.no_grad():
            self.network.set_cond_image(image)
        return unet, dataclasses.replace(prompt, controlnet_image=None)


class LLLiteTarget(SingleNetworkTarget):
    """A ControlNet-LLLite network on a frozen SDXL model (``sdxl_train_control_net_lllite.py``)."""

    needs_conditioning_images = True
    tracker_name = "lllite_control_net_train"

    def __init__(self) -> None:
        self.network = None  # the bare network (saved, hooked)
        self.prepared: nn.Module | None = None  # what accelerate returned

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        from library.controlnet.target import check_sample_control_images

        args.save_model_as = args.save_model_as or "safetensors"
        if args.network_weights and not os.path.isfile(args.network_weights):
            raise ArgumentError(f"--network_weights {args.network_weights}: no such file (an LLLite .safetensors file "
                                "to continue training from)")
        for flag in ("cond_emb_dim", "network_dim"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ArgumentError(f"--{flag} must be a positive integer, got {value}")
        if args.cond_emb_dim is not None and args.cond_emb_dim % 2:
            raise ArgumentError(f"--cond_emb_dim must be even (its first convolution has half the channels), got "
                                f"{args.cond_emb_dim}")
        if args.network_dropout is not None and not 0.0 <= args.network_dropout < 1.0:
            raise ArgumentError(f"--network_dropout must be in [0, 1), got {args.network_dropout}")
        check_conditioning_data_dir(args)
        check_sample_control_images(args)
        # Read by the shared checks: the text encoders are frozen, so their outputs may be cached.
        args.network_train_unet_only = True
        args.log_tracker_name = args.log_tracker_name or self.tracker_name

    def prepare_data(self, args, family: ModelFamily, models: FamilyModels, groups: list) -> None:
        for group in groups:  # every bucket side must reach the deepest level's token grid exactly
            if hasattr(group, "verify_bucket_reso_steps"):
                group.verify_bucket_reso_steps(SIZE_MULTIPLE)

    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        from networks.control_net_lllite import LLLiteError, create_network, create_network_from_weights

        try:
            if args.network_weights:
                network = create_network_from_weights(models.denoiser, args.network_weights,
                                                      dropout=args.network_dropout)
                for flag, value in (("cond_emb_dim", network.cond_emb_dim), ("network_dim", network.mlp_dim)):
                    given = getattr(args, flag)
                    if given is not None and given != value:
                        raise ArgumentError(f"--{flag} {given} differs from --network_weights {args.network_weights} "
                                            f"({value}): drop --{flag}, the file's dims are used")
                logger.info("continuing ControlNet-LLLite %s", args.network_weights)
            else:
                network = create_network(models.denoiser, args.cond_emb_dim, args.network_dim,
                                         dropout=args.network_dropout)
        except LLLiteError as e:
            raise ArgumentError(str(e)) from None
        network.apply_to()
        self.network = self.prepared = network
        models.extra["unet_control"] = LLLiteControl(network)

    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        self.network.to(next(models.denoiser.parameters()).device)
        self.network.prepare_grad_etc()
        self.network.train()

    # --- optimizer and accelerate ----------------------------------------------------------------
    def optimizer_params(self, args):
        lr = args.control_net_lr if getattr(args, "control_net_lr", None) is not None else args.learning_rate
        return self.network.prepare_optimizer_params(lr)

    def on_epoch_start(self, family: ModelFamily, models: FamilyModels) -> None:
        self.network.on_epoch_start()

    # --- saving --------------------------------------------------------------------------------
    def save(self, path: Path, dtype, metadata, *, epoch: int, step: int) -> None:
        self.network.save_weights(str(path), dtype, lllite_metadata(metadata, self.network))
