"""Caption / tag files next to the images: ``<image stem><caption_extension>``, UTF-8, written atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from library.io_utils import atomic_path

logger = logging.getLogger(__name__)


def normalized_extension(extension: str) -> str:
    """``.caption`` for ``.caption`` or ``caption`` (the dot is added as the dataset does)."""
    return extension if extension.startswith(".") else "." + extension


def caption_path(image: Path, extension: str) -> Path:
    """``dir/a.png`` -> ``dir/a<extension>``: the file the dataset reads the caption from."""
    image = Path(image)
    return image.with_name(image.stem + normalized_extension(extension))


def write_caption(path: Path, text: str) -> None:
    """Write ``text`` and a newline to ``path`` (UTF-8), atomically: a kill leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text + "\n", encoding="utf-8")


def read_text(path: Path) -> str | None:
    """The text of an existing caption file (UTF-8, BOM accepted, stripped); None when there is none.

    A file that is not UTF-8 is decoded with replacement characters and warned about, so one bad
    file does not stop an ``--append_tags`` run.
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        logger.warning("%s is not UTF-8 (invalid byte at offset %d): read with replacement characters", path,
                       e.start)
        text = data.decode("utf-8", errors="replace")
    return text.strip()


def drop_shared_outputs(images: Sequence[Path], extension: str) -> list[Path]:
    """``images`` without those whose caption file another image (listed earlier) already writes.

    ``a.png`` and ``a.jpg`` share ``a.caption``; the dataset would give both the same caption, so the
    later one is skipped with a warning instead of silently overwriting the first one's file.
    """
    owners: dict[Path, Path] = {}
    kept: list[Path] = []
    for image in images:
        target = caption_path(image, extension)
        owner = owners.setdefault(target, image)
        if owner != image:
            logger.warning("%s and %s share the caption file %s: %s skipped (rename one of them)", owner.name,
                           image.name, target.name, image)
            continue
        kept.append(image)
    return kept
