"""Train a LoRA (or any network module) for FLUX.1 dev/schnell, or Chroma (``--model_type chroma``).

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_flux_lora \
        --network_module networks.lora_flux --network_train_unet_only --cache_text_encoder_outputs

Same flags as kohya-ss/sd-scripts' flux_train_network.py; see docs/flux_train_network.md.
"""

from __future__ import annotations

import sys

from library.args import setup_flux_network_parser
from library.training.entry import main as train_main


def setup_parser():
    return setup_flux_network_parser()


#: the model family of each ``--model_type``
FAMILIES = {"flux": "library.families.flux.family:FluxFamily",
            "chroma": "library.families.flux.chroma_family:ChromaFamily"}


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, lambda args: FAMILIES[args.model_type], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
