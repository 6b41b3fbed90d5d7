"""Merge LoRAs of any ranks into one LoRA of a chosen rank: the weighted sum of their deltas, cut by SVD.

    python networks/svd_merge_lora.py --save_to merged.safetensors --models a.safetensors b.safetensors \
        --ratios 0.7 0.5 --new_rank 16 --device cuda

SD 1.x/2.x or SDXL is recognised from the files' keys. Same flags as kohya-ss/sd-scripts'
networks/svd_merge_lora.py; see docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python networks/svd_merge_lora.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402
from networks.lora_tool_args import add_merge_arguments, run_tool  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge SD 1.x/2.x or SDXL LoRAs: sum ratio * delta per module, then SVD to --new_rank.")
    parser.add_argument("--lbws", type=str, nargs="*", default=None,
                        help='LoRA Block Weight vector per model, e.g. "[1,0,0,...]": SD 1.x/2.x 17 or 26 values, '
                             'SDXL 12 or 20 (see docs/lora_tools.md); BASE = the text encoder(s)')
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the merged Linear and 1x1-conv modules (default 4); alpha = rank")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of the merged 3x3-conv modules (default: --new_rank)")
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default cpu)")
    add_merge_arguments(parser, models_help='LoRA files to merge', stacking=False)
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from networks.lora_merge import run_svd_merge

    run_tool(run_svd_merge, args)


if __name__ == "__main__":
    main(sys.argv[1:])
