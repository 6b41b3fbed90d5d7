"""Train a textual inversion embedding for SDXL (vectors for both text encoders).

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path sdxl.safetensors \
        --train_data_dir train --output_dir out --token_string zxqtoy --init_word toy \
        --num_vectors_per_token 4 --resolution 1024 --save_model_as safetensors

Same flags as kohya-ss/sd-scripts' sdxl_train_textual_inversion.py; writes ``{"clip_l": [n, 768],
"clip_g": [n, 1280]}``. See docs/train_textual_inversion.md.
"""

from __future__ import annotations

import sys

from library.args import setup_sdxl_textual_inversion_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_sdxl_textual_inversion_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sdxl.family:SDXLFamily", argv,
               target="library.training.textual_inversion:SDXLEmbeddingTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
