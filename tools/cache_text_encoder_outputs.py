"""Run the text encoders over every caption once and write the cache files the trainers read.

    python tools/cache_text_encoder_outputs.py --sdxl --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config data.toml --text_encoder_batch_size 8 --mixed_precision bf16
    python tools/cache_text_encoder_outputs.py --flux --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --dataset_config data.toml

Takes the flags of the family's trainer (``--sdxl``: ``sdxl_train_network.py``, ``--flux``:
``flux_train_network.py``, ``--sd3``: ``sd3_train_network.py``, ``--lumina``: ``lumina_train_network.py``;
SD 1.x/2.x have no text-encoder cache),
so training with ``--cache_text_encoder_outputs_to_disk`` and the same flags finds every file valid.
See docs/model_tools.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/cache_text_encoder_outputs.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.log import setup_logging  # noqa: E402
from library.model_tools.caching import main as caching_main, setup_parser as _setup_parser  # noqa: E402

DESCRIPTION = ("Write the text encoder output cache (<image stem><suffix>.npz) that training with "
               "--cache_text_encoder_outputs_to_disk reads.")


def setup_parser(family: str = "sdxl"):
    return _setup_parser(family, DESCRIPTION)


def main(argv: list[str] | None = None) -> None:
    caching_main(argv, text_encoder_outputs=True, description=DESCRIPTION, setup_logging=setup_logging)


if __name__ == "__main__":
    main(sys.argv[1:])
