"""Train a LoRA (or any network module) for Stable Diffusion 1.x/2.x.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_module networks.lora

Same flags as kohya-ss/sd-scripts' train_network.py; see docs/train_network.md.
"""

from __future__ import annotations

import sys

from library.args import setup_network_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_network_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sd.family:StableDiffusionFamily", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
