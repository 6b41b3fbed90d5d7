"""Command-line pieces the LoRA merge scripts share (torch-free, so ``--help`` stays instant)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

PRECISION_CHOICES = ["float", "fp16", "bf16"]


def add_merge_arguments(parser: argparse.ArgumentParser, *, models_help: str, stacking: bool) -> None:
    """``--save_to --models --ratios --precision --save_precision --no_metadata`` (+ ``--concat
    --shuffle`` when ``stacking``): the flags every merge script takes, with kohya's names and defaults."""
    parser.add_argument("--save_to", type=str, default=None,
                        help="output file (.safetensors, or .ckpt/.pt for a torch file); never one of the inputs")
    parser.add_argument("--models", type=str, nargs="+", required=True, help=models_help)
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per model (default 1.0 each)")
    parser.add_argument("--precision", type=str, default="float", choices=PRECISION_CHOICES,
                        help="precision the merge works in (default float)")
    parser.add_argument("--save_precision", type=str, default="float", choices=PRECISION_CHOICES,
                        help="precision of the saved tensors (default float)")
    if stacking:
        parser.add_argument("--concat", action="store_true",
                            help="LoRA merge: stack the ranks (rank = sum of ranks; exact). Without it ranks must be "
                                 "equal and the up/down weights are added (approximate)")
        parser.add_argument("--shuffle", action="store_true",
                            help="with --concat: shuffle the order of the stacked ranks")
    parser.add_argument("--no_metadata", action="store_true",
                        help="write only the minimal metadata (ss_network_dim/alpha/module/args, ss_v2, base model)")


def run_tool(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``run``; a bad input file, or an output that cannot be written, ends the program with its
    one-line message instead of a traceback. A checkpoint of the other family names the other merge script."""
    from library.families.script_hints import running_tool
    from library.io_utils import WriteError
    from networks.lora_file import LoRAFileError

    try:
        with running_tool("merge"):
            return run(*args, **kwargs)
    except (LoRAFileError, FileNotFoundError, WriteError) as e:
        raise SystemExit(f"error: {e}") from None
