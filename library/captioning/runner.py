"""The loop every captioning script runs: decode a batch, run the model on it, hand each result on.

    report = run_over_images(images, load_rgb, caption_batch, write_one, batch_size=4, desc="captioning")

``infer`` gets the decoded images of a batch (never an empty list) and returns one result per
image; ``handle(path, result)`` stores it (writes the caption file, collects tags ...). Unreadable
images are skipped with a warning per file and a count at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from library.captioning.batches import loaded_batches

logger = logging.getLogger(__name__)

_SHOWN = 5


@dataclass
class RunReport:
    """The images handled, and the unreadable ones skipped."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def run_over_images(images: Sequence[Path], load: Callable[[Path], Any], infer: Callable[[list[Any]], Sequence[Any]],
                    handle: Callable[[Path, Any], None], *, batch_size: int = 1, workers: int | None = None,
                    desc: str = "captioning") -> RunReport:
    """Run ``infer`` over ``images`` in batches of ``batch_size`` with a progress bar; see the module docstring."""
    from tqdm import tqdm

    report = RunReport()
    with tqdm(total=len(images), desc=desc, unit="image", smoothing=0) as progress:
        for paths, data, skipped in loaded_batches(images, load, batch_size=batch_size, workers=workers):
            report.skipped += skipped
            if paths:
                results = list(infer(data))
                if len(results) != len(paths):  # a model wrapper bug, not a user error
                    raise RuntimeError(f"{len(paths)} images gave {len(results)} results")
                for path, result in zip(paths, results):
                    handle(path, result)
                    report.done.append(path)
            progress.update(len(paths) + len(skipped))
    if report.skipped:
        names = ", ".join(p.name for p in report.skipped[:_SHOWN])
        more = f" and {len(report.skipped) - _SHOWN} more" if len(report.skipped) > _SHOWN else ""
        logger.warning("%d unreadable image(s) skipped: %s%s", len(report.skipped), names, more)
    return report


def caption_to_files(images: Sequence[Path], caption: Callable[[list[Any]], Sequence[str]], *, extension: str,
                     batch_size: int = 1, workers: int | None = None, debug: bool = False) -> RunReport:
    """Caption ``images`` (decoded by :func:`~library.captioning.images.load_rgb`) and write each
    ``<stem><extension>``, overwriting an existing file.

    An empty caption is not written (training refuses an empty caption file): it is warned about.
    """
    from library.captioning.caption_files import caption_path, write_caption
    from library.captioning.images import load_rgb

    def store(image: Path, text: str) -> None:
        if not text:
            logger.warning("%s: the model gave an empty caption; no file written", image)
            return
        write_caption(caption_path(image, extension), text)
        if debug:
            logger.info("%s: %s", image.name, text)

    return run_over_images(images, load_rgb, caption, store, batch_size=batch_size, workers=workers,
                           desc="captioning")


def images_to_caption(train_data_dir: str | Path, *, recursive: bool, extension: str) -> list[Path]:
    """The images of ``train_data_dir`` that get a caption file (two sharing one file: the first only), logged."""
    from library.captioning.caption_files import drop_shared_outputs
    from library.captioning.images import find_images

    images = drop_shared_outputs(find_images(train_data_dir, recursive=recursive), extension)
    logger.info("found %d images in %s%s", len(images), train_data_dir, " (recursive)" if recursive else "")
    if not images:
        logger.warning("no images in %s%s", train_data_dir, "" if recursive else " (sub-folders need --recursive)")
    return images
