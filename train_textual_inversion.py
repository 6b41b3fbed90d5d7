"""Train a textual inversion embedding for Stable Diffusion 1.x/2.x.

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir train --output_dir out --token_string zxqtoy --init_word toy \
        --num_vectors_per_token 4 --learning_rate 5e-3 --max_train_steps 1000

Same flags as kohya-ss/sd-scripts' train_textual_inversion.py; writes ``{"emb_params": [n, dim]}``
(``--save_model_as pt`` by default). See docs/train_textual_inversion.md.
"""

from __future__ import annotations

import sys

from library.args import setup_textual_inversion_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_textual_inversion_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sd.family:StableDiffusionFamily", argv,
               target="library.training.textual_inversion:EmbeddingTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
