"""``--output_path``: all images' tags in one JSON or JSONL file; ``--frequency_tags``: the tag counts.

The file is one the training dataset reads as ``metadata_file`` / ``--in_json`` (keys are absolute
image paths, which it resolves without ``image_dir``):

* ``.jsonl``: one ``{"image_path": "/abs/img.png", "tags": "a, b"}`` object per line;
* anything else: a JSON object ``{"/abs/img.png": {"tags": "a, b"}}``.

An existing file is updated: its other entries and fields (a ``caption`` merged earlier ...) are
kept, and only the ``tags`` of the images tagged now are set.

:class:`TagFiles` (one file per image) and :class:`TagOutputFile` (``--output_path``) are the two
places the tagger script writes to; both give the tags already there for ``--append_tags``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from library.captioning.errors import CaptioningError
from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

Entries = dict[str, dict]


def output_key(image: Path) -> str:
    """The key of an image in the output file: its absolute path."""
    return os.path.abspath(image)


def is_jsonl(path: Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def read_output(path: Path) -> Entries:
    """The entries of an existing ``--output_path`` file (empty when there is none), keyed by image path."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptioningError(f"--output_path {path} exists but is not UTF-8 (offset {e.start}): move it away") from e
    try:
        if is_jsonl(path):
            entries: Entries = {}
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if not isinstance(item, dict) or "image_path" not in item:
                    raise CaptioningError(f"--output_path {path} line {n} has no \"image_path\": move the file away "
                                          "or fix the line")
                entries[str(item["image_path"])] = {k: v for k, v in item.items() if k != "image_path"}
            return entries
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise CaptioningError(f"--output_path {path} exists but is not valid JSON (line {e.lineno}: {e.msg}): "
                              "move it away or fix it") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CaptioningError(f"--output_path {path} exists but is not a JSON object {{image: {{tags}}}}: move it away")
    return data


def write_output(path: Path, entries: Entries) -> None:
    """Write ``entries`` as JSON or JSONL (by the extension of ``path``), UTF-8, atomically."""
    path = Path(path)
    if is_jsonl(path):
        text = "".join(json.dumps({"image_path": key, **entry}, ensure_ascii=False) + "\n"
                       for key, entry in entries.items())
    else:
        text = json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    logger.info("wrote %d entries to %s", len(entries), path)


def log_frequency(counts: Counter) -> None:
    """Log every tag with the number of images it was written for, most frequent first."""
    logger.info("tag frequency (%d tags):", len(counts))
    for tag, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        logger.info("  %s: %d", tag, n)


class TagFiles:
    """Where the tags go without ``--output_path``: ``<stem><extension>`` next to each image."""

    def __init__(self, extension: str):
        self.extension = extension

    def existing(self, image: Path) -> str | None:
        from library.captioning.caption_files import caption_path, read_text

        return read_text(caption_path(image, self.extension))

    def put(self, image: Path, text: str) -> None:
        from library.captioning.caption_files import caption_path, write_caption

        write_caption(caption_path(image, self.extension), text)

    def finish(self) -> None:
        pass


class TagOutputFile:
    """Where the tags go with ``--output_path``: one JSON / JSONL file, read first, written at the end."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = read_output(self.path)

    def existing(self, image: Path) -> str | None:
        tags = self.entries.get(output_key(image), {}).get("tags")
        return tags if isinstance(tags, str) else None

    def put(self, image: Path, text: str) -> None:
        self.entries.setdefault(output_key(image), {})["tags"] = text

    def finish(self) -> None:
        write_output(self.path, self.entries)
