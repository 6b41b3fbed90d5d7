"""Train a LoRA (or any network module) for Lumina-Image 2.0.

    accelerate launch lumina_train_network.py --pretrained_model_name_or_path lumina_2_model_bf16.safetensors \
        --gemma2 gemma_2_2b_fp16.safetensors --ae ae.safetensors --tokenizer_cache_dir tokenizers \
        --dataset_config dataset.toml --output_dir out --output_name my_lumina_lora \
        --network_module networks.lora_lumina --network_train_unet_only --cache_text_encoder_outputs

Same flags as kohya-ss/sd-scripts' lumina_train_network.py; see docs/lumina_train_network.md.
"""

from __future__ import annotations

import sys

from library.families.lumina.args import setup_lumina_network_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_lumina_network_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.lumina.family:LuminaFamily", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
