"""The flags of ``flux_train_control_net.py`` (kohya-ss' names and defaults).

The shared groups of :mod:`library.args` (model, dataset, training, optimizer, validation, the DiT and
FLUX.1 groups with ``--controlnet_model_name_or_path``), without the network and masked-loss groups,
plus the ControlNet ones: ``--conditioning_data_dir`` (the conditioning images), ``--save_model_as``
and two of ours, ``--controlnet_depth`` / ``--controlnet_single_depth`` (the reference fixes a new
ControlNet at 2 double and 0 single blocks; a loaded file's depths always come from the file).
"""

from __future__ import annotations

import argparse

from library.args import add_dit_training_arguments, add_flux_training_arguments, training_parser

#: the reference's depths of a new ControlNet (``ControlNetFlux(params, controlnet_depth=2,
#: controlnet_single_depth=0)``); defined here, not in the model module, so ``--help`` does not import torch
DEFAULT_DEPTH = 2
DEFAULT_SINGLE_DEPTH = 0


def add_flux_controlnet_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FLUX ControlNet")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of conditioning images for --train_data_dir: one per training image, same file stem")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=["safetensors", "ckpt", "pt"],
                   help="format of the saved ControlNet (default safetensors)")
    g.add_argument("--controlnet_depth", type=int, default=DEFAULT_DEPTH,
                   help=f"double blocks of a new ControlNet, copied from the DiT (default {DEFAULT_DEPTH})")
    g.add_argument("--controlnet_single_depth", type=int, default=DEFAULT_SINGLE_DEPTH,
                   help=f"single blocks of a new ControlNet, copied from the DiT (default {DEFAULT_SINGLE_DEPTH})")


def setup_flux_controlnet_parser() -> argparse.ArgumentParser:
    """The parser of flux_train_control_net.py."""
    parser = training_parser("Train a ControlNet for FLUX.1 dev/schnell")
    add_dit_training_arguments(parser)
    add_flux_training_arguments(parser)
    add_flux_controlnet_arguments(parser)
    return parser
