"""Batches of decoded images for a captioner; unreadable files are skipped with a warning.

With ``workers`` threads, the next batches are decoded while the model runs on the current one
(at most ``PREFETCH_BATCHES`` ahead, so memory stays bounded on large folders).
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from library.captioning.images import UnreadableImage

logger = logging.getLogger(__name__)

PREFETCH_BATCHES = 2

Loaded = tuple[list[Path], list[Any], list[Path]]  # (paths decoded, their data, paths skipped)


def _load_one(load: Callable[[Path], Any], path: Path) -> tuple[bool, Any]:
    try:
        return True, load(path)
    except UnreadableImage as e:
        return False, str(e)


def _sorted_out(paths: Sequence[Path], results: Sequence[tuple[bool, Any]]) -> Loaded:
    ok_paths, data, skipped = [], [], []
    for path, (ok, value) in zip(paths, results):
        if ok:
            ok_paths.append(path)
            data.append(value)
        else:
            logger.warning("cannot read image %s (%s): skipped", path, value)
            skipped.append(path)
    return ok_paths, data, skipped


def loaded_batches(paths: Sequence[Path], load: Callable[[Path], Any], *, batch_size: int = 1,
                   workers: int | None = None) -> Iterator[Loaded]:
    """Yield ``(paths, loaded, skipped)`` per batch of up to ``batch_size`` files of ``paths``, in order.

    ``load(path)`` decodes one file and raises :class:`UnreadableImage` for a broken one; that file
    is warned about and listed in ``skipped`` (``paths``/``loaded`` of that batch are then shorter,
    possibly empty). Any other exception propagates.
    """
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), max(1, batch_size))]
    if not workers or workers < 1:
        for chunk in chunks:
            yield _sorted_out(chunk, [_load_one(load, p) for p in chunk])
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[list[Path], list[Future]]] = deque()
        upcoming = iter(chunks)

        def submit_next() -> None:
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append((chunk, [pool.submit(_load_one, load, p) for p in chunk]))

        for _ in range(PREFETCH_BATCHES):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            submit_next()
            yield _sorted_out(chunk, [f.result() for f in futures])
