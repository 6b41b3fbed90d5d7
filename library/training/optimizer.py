"""Optimizer and learning-rate schedule from the kohya flags.

This module covers AdamW (the default), SGDNesterov and any dotted optimizer class path, and the
transformers schedule names. The full optimizer set (8-bit, Lion, Prodigy, D-Adaptation,
Adafactor, schedule-free) is added by the optimizer issue through :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import ast
import importlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from library.args import ArgumentError

logger = logging.getLogger(__name__)


def parse_kv_args(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["betas=0.9,0.99", "weight_decay=0.01"]`` -> ``{"betas": (0.9, 0.99), "weight_decay": 0.01}``.

    Values are Python literals (``ast.literal_eval``); a value that is not a literal stays a string.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ArgumentError(f"{flag}: '{item}' is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ArgumentError(f"--optimizer_type {path}: cannot import it ({e})") from e


#: lower-cased --optimizer_type -> (class path, default kwargs)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("torch.optim.AdamW", {}),
    "sgdnesterov": ("torch.optim.SGD", {"nesterov": True, "momentum": 0.9}),
}


@dataclass
class OptimizerChoice:
    name: str
    cls: type
    kwargs: dict[str, Any]

    def describe(self) -> str:
        """``ss_optimizer`` metadata value: ``module.Class(args)``."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        path = f"{self.cls.__module__}.{self.cls.__name__}"
        return f"{path}({args})" if args else path


def choose_optimizer(args) -> OptimizerChoice:
    kind = (args.optimizer_type or "AdamW").strip()
    kwargs = parse_kv_args(args.optimizer_args, "--optimizer_args")
    if kind.lower() in OPTIMIZERS:
        path, defaults = OPTIMIZERS[kind.lower()]
        return OptimizerChoice(kind, _import_class(path), {**defaults, **kwargs})
    if "." in kind:
        return OptimizerChoice(kind, _import_class(kind), kwargs)
    if hasattr(torch.optim, kind):
        return OptimizerChoice(kind, getattr(torch.optim, kind), kwargs)
    known = ", ".join(sorted(OPTIMIZERS))
    raise ArgumentError(
        f"--optimizer_type {kind}: not supported here yet (known: {known}, or a dotted class path such as "
        "torch.optim.Adam or bitsandbytes.optim.AdamW8bit)"
    )


def make_optimizer(choice: OptimizerChoice, params, lr: float) -> torch.optim.Optimizer:
    return choice.cls(params, lr=lr, **choice.kwargs)


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


def make_lr_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int):
    """A transformers schedule by name; ``total_steps`` is the count of optimizer steps."""
    from transformers.optimization import SchedulerType, get_scheduler

    name = args.lr_scheduler
    valid = [t.value for t in SchedulerType]
    if name not in valid:
        raise ArgumentError(f"--lr_scheduler {name}: unknown (valid: {', '.join(valid)})")
    warmup = resolve_steps(args.lr_warmup_steps, total_steps, "--lr_warmup_steps")
    kwargs: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = args.lr_scheduler_num_cycles
    elif name == "polynomial":
        kwargs["power"] = args.lr_scheduler_power
    if name == "constant" and warmup:
        logger.warning("--lr_warmup_steps is ignored by the 'constant' schedule; use constant_with_warmup")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs or None)


def steps_per_epoch(num_batches: int, grad_accum: int, num_processes: int = 1) -> int:
    return math.ceil(num_batches / num_processes / grad_accum)
