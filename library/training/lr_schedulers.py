"""``--lr_scheduler`` / ``--lr_scheduler_type``: the learning-rate schedule of a run.

Every schedule is a ``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step, so
accelerate saves and restores it with the state. Sources: transformers' schedule names, ``adafactor``
(transformers' ``AdafactorSchedule``), diffusers' ``piecewise_constant``, or any scheduler class.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from library.args import ArgumentError
from library.training.optimizers import is_schedule_free, parse_kv_args

logger = logging.getLogger(__name__)

#: schedules that need a metric at every step; the training loop steps without one
_METRIC_SCHEDULES = {"reduce_lr_on_plateau", "greedy"}
#: transformers schedules whose ``num_cycles`` counts half-cosines (one cycle = one decay from lr to the minimum)
_HALF_COSINE_CYCLES = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}


def resolve_steps(value: str | int | float | None, total_steps: int, flag: str) -> int:
    """``--lr_warmup_steps``-style values: an integer, a ratio of all steps (< 1), or ``"N%"``."""
    if value is None:
        return 0
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return int(total_steps * float(text[:-1]) / 100)
        number = float(text)
    except ValueError:
        raise ArgumentError(f"{flag}: '{value}' is not a step count, a ratio below 1, or a percentage like '10%'")
    if number < 0:
        raise ArgumentError(f"{flag}: must not be negative (got {value})")
    return int(total_steps * number) if number < 1 else int(number)


def constant_schedule(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """The learning rates stay as set (also the stand-in schedule of schedule-free optimizers)."""
    return LambdaLR(optimizer, lambda _: 1.0)


def _custom_scheduler(name: str, optimizer, kwargs: dict[str, Any]):
    if "." in name:
        module, _, attr = name.rpartition(".")
    else:
        module, attr = "torch.optim.lr_scheduler", name
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ArgumentError(f"--lr_scheduler_type {name}: cannot import it ({e})") from e
    logger.info("learning-rate schedule %s.%s(%s)", module, attr, kwargs)
    try:
        return cls(optimizer, **kwargs)
    except TypeError as e:
        raise ArgumentError(f"--lr_scheduler_type {name} with --lr_scheduler_args {kwargs}: {e}") from e


def _adafactor_schedule(name: str, optimizer, default_lr: float):
    from transformers.optimization import Adafactor, AdafactorSchedule

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, Adafactor):
        raise ArgumentError(f"--lr_scheduler {name}: only for --optimizer_type AdaFactor")
    _, _, value = name.partition(":")
    try:
        initial_lr = float(value) if value else default_lr
    except ValueError:
        raise ArgumentError(f"--lr_scheduler {name}: expected adafactor or adafactor:<initial lr>") from None
    return AdafactorSchedule(inner, initial_lr)


def make_lr_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int):
    """The schedule from the flags; ``total_steps`` is the count of optimizer steps of all processes."""
    name = (args.lr_scheduler or "constant").strip()
    kwargs = parse_kv_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    custom = (getattr(args, "lr_scheduler_type", None) or "").strip()

    if is_schedule_free(optimizer):
        if custom or name != "constant":
            logger.warning("a schedule-free optimizer needs no schedule: --lr_scheduler %s is not used",
                           custom or name)
        return constant_schedule(optimizer)
    if custom:
        return _custom_scheduler(custom, optimizer, kwargs)
    if name.startswith("adafactor"):
        return _adafactor_schedule(name, optimizer, args.learning_rate)
    if name == "piecewise_constant":
        from diffusers.optimization import get_scheduler as diffusers_scheduler

        if "step_rules" not in kwargs:
            raise ArgumentError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=... "
                                "(e.g. step_rules=1:10,0.1:20,0.01 : x1 until step 10, x0.1 until 20, then x0.01)")
        try:
            return diffusers_scheduler(name, optimizer, **kwargs)
        except (TypeError, ValueError) as e:
            raise ArgumentError(f"--lr_scheduler piecewise_constant: {e}") from e
    return _transformers_schedule(args, name, optimizer, total_steps, kwargs)


def _transformers_schedule(args, name: str, optimizer, total_steps: int, kwargs: dict[str, Any]):
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    valid = [t.value for t in SchedulerType if t.value not in _METRIC_SCHEDULES]
    if name in _METRIC_SCHEDULES:
        raise ArgumentError(f"--lr_scheduler {name}: it needs a metric at every step, which the training loop "
                            "does not give; use another schedule or --lr_scheduler_type with a class")
    if name not in valid:
        raise ArgumentError(f"--lr_scheduler {name}: unknown (valid: {', '.join(valid)}, adafactor, "
                            "piecewise_constant; or --lr_scheduler_type for a scheduler class)")
    warmup = resolve_steps(args.lr_warmup_steps, total_steps, "--lr_warmup_steps")
    decay = resolve_steps(getattr(args, "lr_decay_steps", None), total_steps, "--lr_decay_steps")
    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    timescale = getattr(args, "lr_scheduler_timescale", None)

    if name == "constant":
        if warmup:
            logger.warning("--lr_warmup_steps is ignored by the 'constant' schedule; use constant_with_warmup")
        return constant_schedule(optimizer)
    if warmup > total_steps:
        raise ArgumentError(f"--lr_warmup_steps {args.lr_warmup_steps} = {warmup} steps, more than the "
                            f"{total_steps} steps of the run")
    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    accepted = set(inspect.signature(func).parameters)
    call: dict[str, Any] = {"num_warmup_steps": warmup}
    if "num_training_steps" in accepted:
        call["num_training_steps"] = total_steps
    if name == "cosine_with_restarts":
        call["num_cycles"] = num_cycles
    elif name in _HALF_COSINE_CYCLES:
        call["num_cycles"] = num_cycles * 0.5
    if name == "polynomial":
        call["power"] = args.lr_scheduler_power
    if name == "inverse_sqrt" and timescale is not None:
        call["timescale"] = timescale
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        if min_lr_ratio is None and not {"min_lr", "min_lr_rate"} & set(kwargs):
            raise ArgumentError(f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        if min_lr_ratio is not None:
            call["min_lr_rate"] = min_lr_ratio
    if name == "warmup_stable_decay":
        if warmup + decay > total_steps:
            raise ArgumentError(f"warmup_stable_decay: --lr_warmup_steps ({warmup}) + --lr_decay_steps ({decay}) "
                                f"exceed the {total_steps} steps of the run")
        call.update(num_decay_steps=decay, num_stable_steps=total_steps - warmup - decay,
                    min_lr_ratio=min_lr_ratio or 0.0)
        call.pop("num_training_steps", None)
    elif decay:
        logger.warning("--lr_decay_steps is used only by warmup_stable_decay")
    call.update(kwargs)  # --lr_scheduler_args win (e.g. lr_end=1e-6 for polynomial)
    unknown = set(call) - accepted
    if unknown:
        raise ArgumentError(f"--lr_scheduler {name} does not take {', '.join(sorted(unknown))} "
                            f"(it takes: {', '.join(sorted(accepted - {'optimizer', 'last_epoch'}))})")
    return func(optimizer, **call)
