"""Merge LoRAs into an SDXL checkpoint, or merge several SDXL LoRAs into one, with optional block weights.

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --save_to merged.safetensors \
        --models style.safetensors --ratios 0.8 --lbws "[1,1,1,1,1,0,1,1,1,1,1,1]"

Same flags as kohya-ss/sd-scripts' networks/sdxl_merge_lora.py; see docs/lora_tools.md (the
``--lbws`` layouts are listed there). A single-file checkpoint is streamed (read, merged and written
one tensor at a time): merging into SDXL needs the memory of the LoRAs and one tensor, not the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/sdxl_merge_lora.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402
from networks.lora_tool_args import add_merge_arguments, run_tool  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge LoRAs into an SDXL checkpoint (--sd_model), or into one SDXL LoRA (without --sd_model).")
    parser.add_argument("--sd_model", type=str, default=None,
                        help="SDXL checkpoint (.safetensors/.ckpt, or a Diffusers folder) to merge into; without it the "
                             "LoRAs are merged into one LoRA")
    parser.add_argument("--lbws", type=str, nargs="*", default=None,
                        help='LoRA Block Weight vector per model, e.g. "[1,0,0,1,1,1,1,1,1,1,1,1]": 12 values (BASE, '
                             'IN04 IN05 IN07 IN08, M00, OUT00-OUT05) or 20 (BASE, IN00-IN08, M00, OUT00-OUT08); '
                             'BASE = the text encoders')
    add_merge_arguments(parser, models_help='SDXL LoRA files to merge', stacking=True)
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from networks.lora_merge import run_merge

    run_tool(run_merge, args, family="sdxl")


if __name__ == "__main__":
    main(sys.argv[1:])
