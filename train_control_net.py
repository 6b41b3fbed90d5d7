"""Train a ControlNet for Stable Diffusion 1.x/2.x on images and their conditioning images.

    accelerate launch train_control_net.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir images --conditioning_data_dir conditioning --resolution 512 \
        --output_dir out --output_name my_controlnet --learning_rate 1e-5

Same flags as kohya-ss/sd-scripts' train_control_net.py; writes a Diffusers-layout ControlNet
(``.safetensors`` by default, a folder with ``--save_model_as diffusers``). See docs/train_control_net.md.
"""

from __future__ import annotations

import sys

from library.controlnet.args import setup_controlnet_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_controlnet_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sd.family:StableDiffusionFamily", argv,
               target="library.controlnet.target:ControlNetTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
