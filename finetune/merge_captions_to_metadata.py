"""Collect caption files into a fine-tuning metadata JSON (the file ``--in_json`` reads).

    python finetune/merge_captions_to_metadata.py train_data meta_cap.json
    python finetune/merge_captions_to_metadata.py train_data meta_cap.json --in_json meta_tags.json --recursive

For every image of ``train_data_dir`` the caption file ``<stem><caption_extension>`` (default
``.caption``) is read (UTF-8; blank lines dropped, several lines kept for wildcards) and stored as
``{"<key>": {"caption": "..."}}``. Keys: the image stem, the relative path without extension with
``--recursive``, the absolute path with ``--full_path`` (see ``finetune/metadata_io.py``). With
``--in_json`` (or when ``out_json`` already exists) the existing entries are kept and only their
``caption`` is replaced. Images without a caption file (or with an empty one) are skipped with a
warning. Same positional arguments and flags as kohya-ss/sd-scripts; docs/finetune_metadata.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python finetune/...): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from finetune.metadata_io import MergeReport, add_merge_arguments, run_merge  # noqa: E402  (torch-free)
from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Merge caption files into a fine-tuning metadata JSON.")
    add_merge_arguments(parser, what="caption", default_extension=".caption")
    add_logging_arguments(parser)
    return parser


def merge_captions(args: argparse.Namespace) -> MergeReport:
    """Run the script on parsed ``args``; returns what was merged and skipped."""
    return run_merge(args, field_name="caption")


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from library.data.errors import DatasetError

    try:
        merge_captions(args)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
