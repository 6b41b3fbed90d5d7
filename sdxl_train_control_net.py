"""Train a ControlNet for Stable Diffusion XL on images and their conditioning images.

    accelerate launch sdxl_train_control_net.py --pretrained_model_name_or_path sdxl.safetensors \
        --train_data_dir images --conditioning_data_dir conditioning --resolution 1024 \
        --output_dir out --output_name my_controlnet --control_net_lr 1e-4 --learning_rate 1e-5

Same flags as kohya-ss/sd-scripts' sdxl_train_control_net.py (``--control_net_lr`` for the ControlNet's
own layers); writes a Diffusers-layout ControlNet. See docs/train_control_net.md.
"""

from __future__ import annotations

import sys

from library.controlnet.args import setup_sdxl_controlnet_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_sdxl_controlnet_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sdxl.family:SDXLFamily", argv,
               target="library.controlnet.target:SDXLControlNetTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
