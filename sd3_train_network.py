"""Train a LoRA (or any network module) for SD3 / SD3.5 (Medium, Large, 3.5 Medium).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --t5xxl t5xxl_fp16.safetensors --dataset_config dataset.toml --output_dir out --output_name my_sd3_lora \
        --network_module networks.lora_sd3 --network_train_unet_only --cache_text_encoder_outputs

Same flags as kohya-ss/sd-scripts' sd3_train_network.py; see docs/sd3_train_network.md.
"""

from __future__ import annotations

import sys

from library.args import setup_sd3_network_parser
from library.config_file import parse_args_with_config
from library.log import setup_logging


def setup_parser():
    return setup_sd3_network_parser()


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = parse_args_with_config(parser, argv)
    setup_logging(args)
    # torch/diffusers load only once the flags are known to be good: `--help` and flag errors are instant.
    from library.families.sd3.family import SD3Family
    from library.training.trainer import NetworkTrainer

    NetworkTrainer(SD3Family()).train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
