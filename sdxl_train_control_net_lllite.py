"""Train a ControlNet-LLLite network for Stable Diffusion XL on images and their conditioning images.

    accelerate launch sdxl_train_control_net_lllite.py --pretrained_model_name_or_path sdxl.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name canny_lllite \
        --cond_emb_dim 32 --network_dim 64 --learning_rate 2e-4 --cache_latents --cache_text_encoder_outputs

Same flags as kohya-ss/sd-scripts' sdxl_train_control_net_lllite.py (no ``--network_module``: the network
is always ControlNet-LLLite); writes ``lllite_unet_*`` files that gen_img.py's ``--control_net_lllite_models``
and the ComfyUI LLLite node load. See docs/sdxl_train_control_net_lllite.md.
"""

from __future__ import annotations

import argparse
import sys

from library.args import add_sdxl_training_arguments, training_parser
from library.training.entry import main as train_main


def add_lllite_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ControlNet-LLLite")
    g.add_argument("--cond_emb_dim", type=int, default=None,
                   help="channels of the conditioning image embedding (default 16; the reference's canny uses 32)")
    g.add_argument("--network_dim", type=int, default=None,
                   help="width (rank) of each LLLite module's down/mid/up layers (default 16; canny: 64)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on each module's mid output")
    g.add_argument("--network_weights", type=str, default=None,
                   help="LLLite file to continue training from (its dims are used)")
    g.add_argument("--control_net_lr", type=float, default=None,
                   help="learning rate of the LLLite network (default: --learning_rate)")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of conditioning images for --train_data_dir: one per training image, same file stem")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                   help="file format of the network (default safetensors)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    g.add_argument("--training_comment", type=str, default=None, help="comment stored in the metadata")
    g.add_argument("--no_metadata", action="store_true", help="store only the minimal metadata")


def setup_parser() -> argparse.ArgumentParser:
    parser = training_parser("Train a ControlNet-LLLite network for Stable Diffusion XL")
    add_sdxl_training_arguments(parser)
    add_lllite_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sdxl.family:SDXLFamily", argv,
               target="library.training.lllite:LLLiteTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
