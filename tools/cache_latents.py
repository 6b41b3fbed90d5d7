"""Encode the training images with the VAE once and write the latent cache files the trainers read.

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors --dataset_config data.toml
    python tools/cache_latents.py --sdxl --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config data.toml --vae_batch_size 4

Takes the flags of the trainer of the model family (``train_network.py``; ``--sdxl``:
``sdxl_train_network.py``, ``--flux``: ``flux_train_network.py``, ``--sd3``: ``sd3_train_network.py``,
``--lumina``: ``lumina_train_network.py``),
so the same command line or ``--config_file`` can be used for both; training with
``--cache_latents_to_disk`` then finds every file valid. See docs/model_tools.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/cache_latents.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.log import setup_logging  # noqa: E402
from library.model_tools.caching import main as caching_main, setup_parser as _setup_parser  # noqa: E402

DESCRIPTION = "Write the latent cache (.npz next to each image) that training with --cache_latents_to_disk reads."


def setup_parser(family: str = "sd"):
    return _setup_parser(family, DESCRIPTION)


def main(argv: list[str] | None = None) -> None:
    caching_main(argv, text_encoder_outputs=False, description=DESCRIPTION, setup_logging=setup_logging)


if __name__ == "__main__":
    main(sys.argv[1:])
