"""Ctrl-C (SIGINT) and SIGTERM during training: stop at the next step boundary, keep what was trained.

A signal only raises a flag; the loop reads it after each optimizer step, where the weights, the
optimizer and the data position belong together, so a state saved there resumes exactly. A
second signal aborts at once (the old behaviour). With several processes the ranks must agree on
the step they stop at: they combine their flags every ``check_every`` steps (one small
collective, at the steps where the loss log already synchronises), so a single process stops
at the very next step and a multi-process run within ``check_every`` steps.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run stopped at a step boundary because of Ctrl-C/SIGTERM; the message says what was kept."""


class InterruptFlag:
    """Context manager: while active, SIGINT/SIGTERM request a stop instead of killing the run."""

    def __init__(self, *, check_every: int = 1):
        self.check_every = max(1, check_every)
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers only live there
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal API
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: stopping after the current step (send it again to abort at once)",
                       signal.Signals(signum).name)

    def stop_now(self, accelerator, step: int) -> bool:
        """Whether every process should stop after ``step`` (the same answer on every rank)."""
        if accelerator.num_processes == 1:
            return self.requested
        if step % self.check_every:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
