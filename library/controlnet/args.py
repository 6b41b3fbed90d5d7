"""The flags of ``train_control_net.py`` and ``sdxl_train_control_net.py`` (kohya's names and defaults).

The shared groups of :mod:`library.args` (model, dataset, training, optimizer, noise/loss, validation),
without the network and masked-loss groups, plus the ControlNet flags: ``--controlnet_model_name_or_path``,
``--conditioning_data_dir`` (the conditioning images, not masks), ``--save_model_as`` and
``--no_half_vae``; SDXL adds its caching flags and ``--control_net_lr``.
"""

from __future__ import annotations

import argparse

from library.args import (add_custom_train_arguments, add_dataset_arguments, add_logging_arguments,
                          add_model_spec_arguments, add_noise_and_loss_arguments, add_optimizer_arguments,
                          add_sd_models_arguments, add_sdxl_training_arguments, add_training_arguments,
                          add_validation_arguments)

SAVE_MODEL_AS = [None, "ckpt", "pt", "safetensors", "diffusers", "diffusers_safetensors"]


def add_controlnet_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ControlNet")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="ControlNet to continue training: a Diffusers folder, or a .safetensors/.ckpt file in the "
                        "Diffusers or the original (control_model.*) layout (default: a new one from the U-Net)")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of conditioning images for --train_data_dir: one per training image, same file stem")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=SAVE_MODEL_AS,
                   help="format of the saved ControlNet: safetensors (default), ckpt, pt, or a diffusers folder")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")


def _base(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_logging_arguments(parser)
    add_sd_models_arguments(parser)
    add_model_spec_arguments(parser)
    add_dataset_arguments(parser, support_dreambooth=False, support_caption=True)
    add_training_arguments(parser, support_dreambooth=False)
    add_optimizer_arguments(parser)
    add_validation_arguments(parser)
    add_noise_and_loss_arguments(parser)
    add_custom_train_arguments(parser)
    add_controlnet_arguments(parser)
    return parser


def setup_controlnet_parser() -> argparse.ArgumentParser:
    """The parser of train_control_net.py (SD 1.x/2.x)."""
    return _base("Train a ControlNet for a Stable Diffusion 1.x/2.x model")


def setup_sdxl_controlnet_parser() -> argparse.ArgumentParser:
    """The parser of sdxl_train_control_net.py."""
    parser = _base("Train a ControlNet for a Stable Diffusion XL model")
    add_sdxl_training_arguments(parser)
    parser.add_argument("--control_net_lr", type=float, default=1e-4,
                        help="learning rate of the ControlNet's own layers (conditioning embedding, zero "
                             "convolutions); its copy of the U-Net encoder uses --learning_rate")
    return parser
