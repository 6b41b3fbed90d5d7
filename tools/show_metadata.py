"""Print the metadata of a ``.safetensors`` file as pretty JSON.

    python tools/show_metadata.py --model my_lora.safetensors

Keys are sorted; values that are themselves JSON objects or lists (``ss_datasets``,
``ss_tag_frequency``, ``ss_network_args``, ``ss_bucket_info`` ...) are decoded and shown nested.
Plain values stay the strings they are in the file. Only the file's header is read (no tensors, no
torch), so this is instant even for multi-GB checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402

logger = logging.getLogger(__name__)

#: a header larger than this is not a safetensors header (the format caps it at 100 MB)
_MAX_HEADER = 100_000_000


class MetadataError(ValueError):
    """The file is not a readable safetensors file."""


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print a safetensors file's metadata as JSON.")
    parser.add_argument("--model", type=str, required=True, help="a .safetensors file (LoRA or checkpoint)")
    add_logging_arguments(parser)
    return parser


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} when it has none), read from the header only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise MetadataError(f"{path}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER:
            raise MetadataError(f"{path}: not a safetensors file (a .ckpt/.pt file has no metadata to show)")
        raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MetadataError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise MetadataError(f"{path}: not a safetensors file (unexpected header)")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def decode_value(value: str) -> Any:
    """A value that is a JSON object or list, decoded (recursively); anything else unchanged."""
    text = value.strip()
    if text[:1] in ("{", "[") and text[-1:] in ("}", "]"):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            return value
        return _decode_nested(decoded)
    return value


def _decode_nested(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _decode_nested(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_nested(v) for v in obj]
    if isinstance(obj, str):
        return decode_value(obj)
    return obj


def pretty_metadata(metadata: dict[str, str]) -> str:
    """The metadata as indented JSON: keys sorted, JSON-valued strings nested."""
    decoded = {key: decode_value(metadata[key]) for key in sorted(metadata)}
    return json.dumps(decoded, indent=4, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    try:
        metadata = read_safetensors_metadata(args.model)
    except (FileNotFoundError, MetadataError) as e:
        raise SystemExit(f"error: {e}") from None
    if not metadata:
        logger.warning("%s has no metadata", args.model)
    print(pretty_metadata(metadata))


if __name__ == "__main__":
    main(sys.argv[1:])
