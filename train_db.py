"""DreamBooth: train a Stable Diffusion 1.x/2.x model (U-Net and text encoder) on your images and class images.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_model --save_model_as safetensors

Same flags as kohya-ss/sd-scripts' train_db.py; see docs/train_db.md.
"""

from __future__ import annotations

import sys

from library.args import setup_db_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_db_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sd.family:StableDiffusionFamily", argv,
               target="library.training.fine_tune:DreamBoothTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
