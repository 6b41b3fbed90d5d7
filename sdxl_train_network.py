"""Train a LoRA (or any network module) for Stable Diffusion XL.

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_module networks.lora \
        --network_train_unet_only --cache_text_encoder_outputs

Same flags as kohya-ss/sd-scripts' sdxl_train_network.py; see docs/sdxl_train_network.md.
"""

from __future__ import annotations

import sys

from library.args import setup_sdxl_network_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_sdxl_network_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sdxl.family:SDXLFamily", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
