"""Fine-tune or DreamBooth-train an SDXL model (its U-Net, and with --train_text_encoder both text encoders).

    accelerate launch sdxl_train.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_model --save_model_as safetensors

Same flags as kohya-ss/sd-scripts' sdxl_train.py; see docs/sdxl_train.md.
"""

from __future__ import annotations

import sys

from library.args import setup_sdxl_train_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_sdxl_train_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sdxl.family:SDXLFamily", argv,
               target="library.training.fine_tune:ModelTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
