"""Merge several full checkpoints into one: the weighted sum of their tensors, one tensor at a time.

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.7 0.3 --output ab.safetensors
    python tools/merge_models.py --models a.safetensors b.safetensors c.safetensors --unet_only \
        --saving_precision fp16 --output abc_unet.safetensors

Same flags as kohya-ss/sd-scripts' tools/merge_models.py; see docs/model_tools.md. Any
architecture whose files share their keys (SD 1.x/2.x, SDXL, SD3, FLUX.1 ...); models of different
architectures, or with differently shaped tensors, are refused before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_models.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402

PRECISION_CHOICES = ["float", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Weighted merge of full checkpoints (.safetensors/.ckpt).")
    parser.add_argument("--models", type=str, nargs="+", required=True, help="checkpoints to merge (two or more)")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="one weight per model, used as given (default: 1/N each)")
    parser.add_argument("--output", type=str, required=True, help="merged checkpoint (.safetensors, or .ckpt)")
    parser.add_argument("--unet_only", action="store_true",
                        help="merge only the U-Net/denoiser (model.diffusion_model.*); the rest is the first model's")
    parser.add_argument("--device", type=str, default="cpu", help="where the sums are computed (default cpu)")
    parser.add_argument("--precision", type=str, default="float", choices=PRECISION_CHOICES,
                        help="precision the sums are computed in (default float)")
    parser.add_argument("--saving_precision", type=str, default="float", choices=PRECISION_CHOICES,
                        help="precision of the saved tensors (default float)")
    parser.add_argument("--show_skipped", action="store_true",
                        help="list the tensors that are not merged (copied from the first model, or left out)")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from library.model_tools.checkpoints import ModelToolError
    from library.model_tools.merge_models import run
    from library.model_tools.tensor_files import TensorFileError

    try:
        run(args)
    except (ModelToolError, TensorFileError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
