"""Optimizer and learning-rate schedule from the kohya flags: the entry points the trainer uses.

The optimizer names and their rules live in :mod:`library.training.optimizers`, the schedules in
:mod:`library.training.lr_schedulers`; ``docs/optimizers.md`` is the user guide.
"""

from __future__ import annotations

import math

from library.training.lr_schedulers import constant_schedule, make_lr_scheduler, resolve_steps
from library.training.optimizers import (
    OPTIMIZERS,
    OptimizerChoice,
    OptimizerSpec,
    choose_optimizer,
    is_schedule_free,
    lr_log_values,
    make_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
    optimizer_type_from_args,
    parse_kv_args,
)

__all__ = [
    "OPTIMIZERS", "OptimizerChoice", "OptimizerSpec", "choose_optimizer", "constant_schedule", "is_schedule_free",
    "lr_log_values", "make_lr_scheduler", "make_optimizer", "optimizer_eval_mode", "optimizer_train_mode",
    "optimizer_type_from_args", "parse_kv_args", "resolve_steps", "steps_per_epoch",
]


def steps_per_epoch(num_batches: int, grad_accum: int, num_processes: int = 1) -> int:
    return math.ceil(num_batches / num_processes / grad_accum)
