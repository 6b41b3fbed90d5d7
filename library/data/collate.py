"""DataLoader glue: the collate function and the training position shared with workers.

The dataset yields whole batches, so the DataLoader runs with ``batch_size=1`` and
:func:`collate_batch` just unwraps the single element.

Why the shared position: captions depend on the epoch (caption dropout every N epochs, and the
seed of every random choice) and on the step (token warmup). DataLoader workers are separate
processes holding their own copy of the dataset; with ``persistent_workers`` they live across
epochs, so a plain attribute set by the trainer in the main process would never reach them.
:class:`TrainingProgress` keeps the values in shared memory (``multiprocessing.RawArray``), which
workers inherit when they start (fork) or receive while being spawned, so every later
``set_current_epoch`` in the main process is seen by all workers.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


class TrainingProgress:
    """Epoch (from 1), global step (from 0) and max train steps, shared across processes.

    Writes and reads of one 64-bit value are atomic enough for this purpose (the trainer is the
    only writer), hence no lock.
    """

    _EPOCH, _STEP, _MAX_STEPS = range(3)

    def __init__(self, *, epoch: int = 1, step: int = 0, max_train_steps: int = 0):
        self._values = multiprocessing.RawArray("q", 3)
        self.epoch, self.step, self.max_train_steps = epoch, step, max_train_steps

    @property
    def epoch(self) -> int:
        return int(self._values[self._EPOCH])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._values[self._EPOCH] = int(value)

    @property
    def step(self) -> int:
        return int(self._values[self._STEP])

    @step.setter
    def step(self, value: int) -> None:
        self._values[self._STEP] = int(value)

    @property
    def max_train_steps(self) -> int:
        return int(self._values[self._MAX_STEPS])

    @max_train_steps.setter
    def max_train_steps(self, value: int) -> None:
        self._values[self._MAX_STEPS] = int(value)


class FollowsTrainingProgress:
    """The trainer-facing setters of a dataset whose ``progress`` is a :class:`TrainingProgress`."""

    progress: TrainingProgress

    def set_current_epoch(self, epoch: int) -> None:
        """Epochs count from 1 (caption_dropout_every_n_epochs drops in epochs N, 2N, ...)."""
        self.progress.epoch = epoch

    def set_current_step(self, step: int) -> None:
        self.progress.step = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.progress.max_train_steps = max_train_steps


def collate_batch(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Unwrap the batch-of-one the DataLoader builds around each pre-batched dataset item."""
    if len(examples) != 1:
        raise ValueError(f"the dataset yields whole batches: use DataLoader(batch_size=1), got {len(examples)} items")
    return examples[0]
