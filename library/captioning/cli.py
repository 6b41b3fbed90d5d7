"""Flags every captioning script shares, and turning user errors into one ``error:`` line."""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

from library.captioning.errors import CaptioningError


def add_folder_arguments(parser: argparse.ArgumentParser, *, default_extension: str, what: str = "caption") -> None:
    """``train_data_dir``, ``--caption_extension`` (+ the old ``--caption_extention`` spelling), ``--recursive``."""
    parser.add_argument("train_data_dir", type=str, help="folder holding the images")
    parser.add_argument("--caption_extension", "--caption_extention", type=str, default=default_extension,
                        help=f"extension of the {what} files written next to the images (default {default_extension})")
    parser.add_argument("--recursive", action="store_true", help="also take the images in sub-folders")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch_size``, ``--max_data_loader_n_workers``, ``--debug``."""
    parser.add_argument("--batch_size", type=int, default=1, help="images run through the model at once (default 1)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="threads decoding images while the model runs (default: decode in the main thread)")
    parser.add_argument("--debug", action="store_true", help="log every image's result")


def check_batch_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CaptioningError(f"--batch_size must be 1 or more (got {args.batch_size})")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise CaptioningError(f"--max_data_loader_n_workers must be 0 or more (got {args.max_data_loader_n_workers})")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`CaptioningError` (and the data pipeline's ``DatasetError``) into ``SystemExit("error: ...")``."""
    from library.data.errors import DatasetError

    try:
        yield
    except (CaptioningError, DatasetError) as e:
        raise SystemExit(f"error: {e}") from None
