"""Shrink the images of a folder to one or more maximum areas, for training at several resolutions.

    python tools/resize_images_to_resolution.py train_images train_images_small \
        --max_resolution 512x512,384x384 --divisible_by 8 --copy_associated_files

Same flags as kohya-ss/sd-scripts' tool: every image gets one output per resolution, named
``<stem>+<WxH>.jpg`` (``.png`` with ``--save_as_png``); images already within an area keep their size.
See docs/model_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/resize_images_to_resolution.py`: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402

INTERPOLATION_CHOICES = ["area", "cubic", "lanczos4", "lanczos", "bicubic", "linear", "bilinear", "nearest"]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resize images to maximum areas (one output per resolution).")
    parser.add_argument("src_img_folder", type=str, help="folder of the images to resize")
    parser.add_argument("dst_img_folder", type=str, help="folder the resized images are written to")
    parser.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256",
                        help="maximum areas as WIDTHxHEIGHT, comma separated (default 512x512,384x384,256x256)")
    parser.add_argument("--divisible_by", type=int, default=1,
                        help="round both sides down to a multiple of this (default 1)")
    parser.add_argument("--interpolation", type=str, default="area", choices=INTERPOLATION_CHOICES,
                        help="resampling filter (default area)")
    parser.add_argument("--save_as_png", action="store_true", help="write .png files instead of .jpg")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="copy the files with the image's name and another extension (captions ...) beside each "
                             "output")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from library.data.errors import DatasetError
    from library.model_tools.checkpoints import ModelToolError
    from library.model_tools.resize_images import run

    try:
        run(args)
    except (ModelToolError, DatasetError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
