"""The flags of ``train_control_net.py`` and ``sdxl_train_control_net.py`` (kohya's names and defaults).

The shared groups of :mod:`library.args` (model, dataset, training, optimizer, noise/loss, validation),
without the network and masked-loss groups, plus the ControlNet flags: ``--controlnet_model_name_or_path``,
``--conditioning_data_dir`` (the conditioning images, not masks), ``--save_model_as`` and
``--no_half_vae``; SDXL adds its caching flags and ``--control_net_lr``.
"""

from __future__ import annotations

import argparse
import logging
import os

from library.args import ArgumentError, add_sdxl_training_arguments, training_parser

logger = logging.getLogger(__name__)

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


def check_conditioning_data_dir(args: argparse.Namespace) -> None:
    """A ``--train_data_dir`` run needs ``--conditioning_data_dir`` (a ``--dataset_config`` sets it per subset)."""
    if not (args.dataset_config or getattr(args, "dataset_class", None)):
        if not args.conditioning_data_dir:
            raise ArgumentError("--conditioning_data_dir is required with --train_data_dir: the folder with one "
                                "conditioning image per training image (same file stem); or use --dataset_config")
        if not os.path.isdir(args.conditioning_data_dir):
            raise ArgumentError(f"--conditioning_data_dir {args.conditioning_data_dir}: no such folder")
    elif args.conditioning_data_dir and args.dataset_config:
        logger.warning("--conditioning_data_dir is ignored with --dataset_config: each subset sets its own "
                       "conditioning_data_dir")


def _base(description: str) -> argparse.ArgumentParser:
    parser = training_parser(description)
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
