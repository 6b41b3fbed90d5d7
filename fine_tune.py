"""Fine-tune a Stable Diffusion 1.x/2.x model (its U-Net, and with --train_text_encoder its text encoder).

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_model --save_model_as safetensors

Same flags as kohya-ss/sd-scripts' fine_tune.py; see docs/fine_tune.md.
"""

from __future__ import annotations

import sys

from library.args import setup_fine_tune_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_fine_tune_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.sd.family:StableDiffusionFamily", argv,
               target="library.training.fine_tune:ModelTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
