"""Train a LoRA (or any network module) for SD3 / SD3.5 (Medium, Large, 3.5 Medium).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --t5xxl t5xxl_fp16.safetensors --dataset_config dataset.toml --output_dir out --output_name my_sd3_lora \
        --network_module networks.lora_sd3 --network_train_unet_only --cache_text_encoder_outputs

Same flags as kohya-ss/sd-scripts' sd3_train_network.py; see docs/sd3_train_network.md.
"""

from __future__ import annotations

import sys

from library.args import setup_sd3_network_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_sd3_network_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sd3.family:SD3Family", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
