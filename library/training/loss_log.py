"""Per-step losses kept on the device and read back in blocks.

Reading a loss with ``.item()`` every step makes the host wait for the accelerator each step.
:class:`LossLog` stores each step's loss in a device tensor and copies a block of steps to the
host every ``flush_every`` steps (and before every save or sample), where they are checked for
NaN/inf, logged with their own step numbers and averaged — the same numbers, far fewer syncs.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable

import torch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN or infinite, before anything is saved from the broken weights."""


class LossLog:
    FLUSH_EVERY = 10  # steps per host read-back of the losses

    def __init__(self, device: torch.device, *, window: int, flush_every: int = FLUSH_EVERY,
                 log: Callable[[dict, int], None] | None = None):
        self.flush_every = max(1, flush_every)
        self._buffer = torch.zeros(self.flush_every, device=device)
        self._steps: list[int] = []
        self._window: deque[float] = deque(maxlen=max(1, window))
        self._epoch_losses: list[float] = []
        self._log = log
        self.last: float | None = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        self._buffer[len(self._steps)] = loss.detach().float()
        self._steps.append(step)
        if len(self._steps) == self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._steps:
            return
        values = self._buffer[: len(self._steps)].tolist()  # the one host sync per block
        for step, value in zip(self._steps, values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the loss became {value} at step {step}; stopping without saving. Try a lower --learning_rate, "
                    "--mixed_precision bf16 instead of fp16, or --max_grad_norm 1.0"
                )
            self._window.append(value)
            self._epoch_losses.append(value)
            self.last = value
            if self._log is not None:
                self._log({"loss/current": value, "loss/average": self.average}, step)
        self._steps.clear()

    @property
    def average(self) -> float:
        return sum(self._window) / len(self._window) if self._window else float("nan")

    def end_epoch(self) -> float:
        """Flush and return the mean loss of the epoch that just ended."""
        self.flush()
        mean = sum(self._epoch_losses) / len(self._epoch_losses) if self._epoch_losses else float("nan")
        self._epoch_losses.clear()
        return mean
