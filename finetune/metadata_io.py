"""Files of the fine-tuning metadata workflow: the metadata JSON, image listing and keys, text files.

The metadata file is a JSON object ``{"<image key>": {"caption": ..., "tags": ..., ...}}`` (the
format ``--in_json`` / ``metadata_file`` reads, see docs/finetune_metadata.md). An image's key is

* its file stem (``img001`` for ``train/img001.png``) -- the default, as kohya writes it;
* with ``recursive`` (images in sub-folders too): its path relative to ``train_data_dir`` without
  the extension, ``/``-separated (``sub/img001``); images directly inside still get their stem;
* with ``full_path``: the absolute path of the file, extension included.

The dataset resolves each form back to the same file (``image_dir / key`` plus an image
extension, or the absolute path), so the keys written here are the keys training reads.

This module imports neither torch nor numpy at import time, so the scripts' ``--help`` is instant;
the image extension list is taken from ``library.data.images`` when images are listed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from library.data.errors import DatasetError
from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

Metadata = dict[str, dict[str, Any]]

_SHOWN = 5  # how many file names a warning lists before "and N more"
_PROGRESS_MIN = 100  # show a progress bar from this many images on


def listing(names: Sequence[str], limit: int = _SHOWN) -> str:
    """``'a', 'b' and 3 more``: a short list of names for log and error messages."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------- images


def list_images(train_data_dir: Path, *, recursive: bool = False) -> list[Path]:
    """The image files in ``train_data_dir`` (and its sub-folders with ``recursive``), sorted by relative path.

    Image extensions are the ones training accepts (``library.data.images.IMAGE_EXTENSIONS``, any
    case). Raises :class:`DatasetError` when the folder does not exist.
    """
    from library.data.images import list_images as images_in  # imports torch/cv2: only once flags are parsed

    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"train_data_dir {folder} does not exist or is not a folder: give the folder holding "
                           "the images")
    return images_in(folder, recursive=recursive)


def image_key(image: Path, train_data_dir: Path, *, full_path: bool = False, recursive: bool = False) -> str:
    """The metadata key of ``image`` (see the module docstring for the three forms)."""
    if full_path:
        return os.path.abspath(image)
    if recursive:
        return Path(image).relative_to(train_data_dir).with_suffix("").as_posix()
    return Path(image).stem


def keyed_images(train_data_dir: Path, *, full_path: bool = False, recursive: bool = False) -> dict[str, Path]:
    """``{key: image path}`` for every image of ``train_data_dir``, in listing order.

    Two images with one key (``a.png`` and ``a.jpg``: same stem) would share one metadata entry
    and one ``<stem>.npz``, so that is an error naming both files.
    """
    folder = Path(train_data_dir)
    keyed: dict[str, Path] = {}
    for path in list_images(folder, recursive=recursive):
        key = image_key(path, folder, full_path=full_path, recursive=recursive)
        if key in keyed:
            raise DatasetError(f"{keyed[key]} and {path} both have the metadata key '{key}' (same name, other "
                               "extension): rename or remove one of them, or use --full_path")
        keyed[key] = path
    logger.info("found %d images in %s%s", len(keyed), folder, " (recursive)" if recursive else "")
    return keyed


# ----------------------------------------------------------------------------------- metadata


def read_metadata(path: Path, *, flag: str = "--in_json") -> Metadata:
    """The metadata object of the JSON file ``path``; errors name the file (and ``flag``) and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{flag} {path} does not exist: give the metadata JSON written by the previous step")
    if path.suffix.lower() == ".jsonl":
        raise DatasetError(f"{flag} {path}: JSONL metadata is read by training but not by these scripts: "
                           "convert it to one JSON object {key: {caption, tags}}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{flag} {path} is not UTF-8 (invalid byte at offset {e.start}): re-save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{flag} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                           "fix the file or write it again") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{flag} {path} holds a JSON {type(data).__name__}, not an object "
                           "{image key: {caption, tags}}: give a metadata file written by these scripts")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise DatasetError(f"{flag} {path}: entry '{key}' is a JSON {type(entry).__name__}, not an object: "
                               "make it {\"caption\": ...} or remove it")
    return data


def write_metadata(path: Path, metadata: Metadata) -> None:
    """Write ``metadata`` as UTF-8 JSON (2-space indent, non-ASCII kept), atomically."""
    text = json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    logger.info("wrote %d entries to %s", len(metadata), path)


# ------------------------------------------------------------------------------ text files


def normalized_extension(extension: str) -> str:
    """``.caption`` for ``.caption`` or ``caption`` (the dot is added as the dataset does)."""
    return extension if extension.startswith(".") else "." + extension


def read_text_file(path: Path) -> str:
    """The text of a caption / tag file: UTF-8 (BOM accepted), lines stripped, blank lines dropped.

    Several non-blank lines are kept (joined with ``\\n``): with ``enable_wildcard`` training
    picks one per step. An empty file gives "". A file that is not UTF-8 raises
    :class:`DatasetError` naming it and the byte offset.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 (invalid byte at offset {e.start}): re-save it with UTF-8 "
                           "encoding") from e
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


@dataclass
class MergeReport:
    """What a merge did: keys updated, and the images skipped (no text file, or an empty one)."""

    merged: list[str] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)


def merge_text_files(images: dict[str, Path], metadata: Metadata, *, field_name: str, extension: str,
                     debug: bool = False) -> MergeReport:
    """Set ``metadata[key][field_name]`` from ``<image stem><extension>`` of every image (in place).

    Existing entries keep their other fields; new keys are added in ``images`` order. Images
    without the text file, or with an empty one, are skipped (reported, warned by the caller) and
    their entries left as they were.
    """
    ext = normalized_extension(extension)
    report = MergeReport()
    for key, image in tqdm(images.items(), desc=f"merging {field_name}", unit="image",
                           disable=len(images) < _PROGRESS_MIN):
        text_path = image.with_name(image.stem + ext)
        if not text_path.is_file():
            report.missing.append(text_path)
            continue
        text = read_text_file(text_path)
        if not text:
            report.empty.append(text_path)
            continue
        metadata.setdefault(key, {})[field_name] = text
        report.merged.append(key)
        if debug:
            logger.info("%s: %s", key, text)
    return report


def add_merge_arguments(parser: argparse.ArgumentParser, *, what: str, default_extension: str) -> None:
    """The positional arguments and flags both merge scripts take (kohya's names and defaults)."""
    parser.add_argument("train_data_dir", type=str, help="folder holding the images (and their text files)")
    parser.add_argument("out_json", type=str,
                        help="metadata JSON to write; if it exists and --in_json is not given, it is updated")
    parser.add_argument("--in_json", type=str, default=None,
                        help="metadata JSON to start from: its entries and their other fields are kept")
    parser.add_argument("--caption_extension", "--caption_extention", type=str, default=default_extension,
                        help=f"extension of the {what} files (default {default_extension})")
    parser.add_argument("--full_path", action="store_true",
                        help="key the entries by the image's absolute path instead of its file stem")
    parser.add_argument("--recursive", action="store_true",
                        help="also take images in sub-folders (keys are the relative paths without extension, "
                             "or full paths with --full_path)")
    parser.add_argument("--debug", action="store_true", help=f"log every image's {what}")


def run_merge(args: argparse.Namespace, *, field_name: str) -> MergeReport:
    """The whole merge script: read (``--in_json``, or an existing ``out_json``), merge, write ``out_json``."""
    from library.training.validation import check_writable_file

    check_writable_file(str(args.out_json), "out_json")  # before reading every caption of the folder
    train_dir = Path(args.train_data_dir)
    images = keyed_images(train_dir, full_path=args.full_path, recursive=args.recursive)
    in_json = args.in_json
    if in_json is None and Path(args.out_json).is_file():
        in_json = args.out_json  # as the reference: an existing output is updated, not replaced
        logger.info("%s exists: updating it (its entries are kept)", args.out_json)
    metadata = read_metadata(Path(in_json)) if in_json is not None else {}
    if in_json is not None:
        logger.info("read %d entries from %s; the images found get their %s replaced", len(metadata), in_json,
                    field_name)
    report = merge_text_files(images, metadata, field_name=field_name, extension=args.caption_extension,
                              debug=args.debug)
    ext = normalized_extension(args.caption_extension)
    if report.missing:
        logger.warning("%d image(s) have no %s file and were skipped: %s", len(report.missing), ext,
                       listing([p.name for p in report.missing]))
    if report.empty:
        logger.warning("%d %s file(s) are empty and were skipped: %s", len(report.empty), ext,
                       listing([p.name for p in report.empty]))
    if not images:
        logger.warning("no images in %s%s", train_dir, "" if args.recursive else " (sub-folders need --recursive)")
    write_metadata(Path(args.out_json), metadata)
    logger.info("%s of %d image(s) merged", field_name, len(report.merged))
    return report
