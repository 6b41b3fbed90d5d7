"""Merge LoRAs into an SD 1.x/2.x checkpoint, or merge several LoRAs into one.

    python networks/merge_lora.py --sd_model v1-5.safetensors --save_to merged.safetensors \
        --models style.safetensors detail.safetensors --ratios 0.8 0.5
    python networks/merge_lora.py --save_to both.safetensors --models a.safetensors b.safetensors --concat

Same flags as kohya-ss/sd-scripts' networks/merge_lora.py; see docs/lora_tools.md. A single-file
checkpoint is streamed (read, merged and written one tensor at a time), so it is never held in
memory. SDXL: sdxl_merge_lora.py; LoRAs of any ranks to a chosen rank: svd_merge_lora.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/merge_lora.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402
from networks.lora_tool_args import add_merge_arguments, run_tool  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge LoRAs into an SD 1.x/2.x checkpoint (--sd_model), or into one LoRA (without --sd_model).")
    parser.add_argument("--v2", action="store_true", help="the checkpoint is Stable Diffusion 2.x")
    parser.add_argument("--sd_model", type=str, default=None,
                        help="checkpoint (.safetensors/.ckpt, or a Diffusers folder) to merge into; without it the LoRAs "
                             "are merged into one LoRA")
    add_merge_arguments(parser, models_help='LoRA files to merge', stacking=True)
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from networks.lora_merge import run_merge

    run_tool(run_merge, args, family="sd")


if __name__ == "__main__":
    main(sys.argv[1:])
