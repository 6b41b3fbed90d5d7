"""``--optimizer_type``: the table of names, the optional packages behind them, and the special rules.

Names are case-insensitive. Each name maps to a class in torch, transformers or an optional package
(bitsandbytes, lion-pytorch, dadaptation, prodigyopt, schedulefree). An optional package that is
missing is reported before training with the pip command that installs it. Anything else is a dotted
class path (``pytorch_optimizer.CAME``) or, without a dot, a class of ``torch.optim``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

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


@dataclass(frozen=True)
class OptimizerSpec:
    """Where a named optimizer lives: ``module.attr``, the pip package, kwargs added when absent."""

    module: str
    attr: str
    package: str | None = None  # None: torch / transformers, always installed
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.attr}"


def _bnb(attr: str, **defaults) -> OptimizerSpec:
    return OptimizerSpec("bitsandbytes.optim", attr, "bitsandbytes", defaults)


#: --optimizer_type (matched case-insensitively) -> where the class is and the kwargs it gets unless set
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "AdamW": OptimizerSpec("torch.optim", "AdamW"),
    "AdamW8bit": _bnb("AdamW8bit"),
    "PagedAdamW": _bnb("PagedAdamW"),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit"),
    "Lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch"),
    "Lion8bit": _bnb("Lion8bit"),
    "PagedLion8bit": _bnb("PagedLion8bit"),
    "SGDNesterov": OptimizerSpec("torch.optim", "SGD", None, {"nesterov": True, "momentum": 0.9}),
    "SGDNesterov8bit": _bnb("SGD8bit", nesterov=True, momentum=0.9),
    "DAdaptation": OptimizerSpec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdamPreprint": OptimizerSpec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdaGrad": OptimizerSpec("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptAdam": OptimizerSpec("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptAdan": OptimizerSpec("dadaptation", "DAdaptAdan", "dadaptation"),
    "DAdaptAdanIP": OptimizerSpec("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "DAdaptLion": OptimizerSpec("dadaptation", "DAdaptLion", "dadaptation"),
    "DAdaptSGD": OptimizerSpec("dadaptation", "DAdaptSGD", "dadaptation"),
    "Prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt"),
    "AdaFactor": OptimizerSpec("transformers.optimization", "Adafactor"),
    "RAdamScheduleFree": OptimizerSpec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "AdamWScheduleFree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "SGDScheduleFree": OptimizerSpec("schedulefree", "SGDScheduleFree", "schedulefree"),
}
_BY_LOWER = {name.lower(): spec for name, spec in OPTIMIZERS.items()}

#: the legacy switches and the --optimizer_type each one stands for
LEGACY_FLAGS = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


@dataclass
class OptimizerChoice:
    name: str
    cls: type
    kwargs: dict[str, Any]
    pass_lr: bool = True  # False for Adafactor with relative_step: it computes its own step size

    @property
    def class_path(self) -> str:
        """``module.Class`` of the optimizer (what a saved state's optimizer file belongs to)."""
        return f"{self.cls.__module__}.{self.cls.__name__}"

    def describe(self) -> str:
        """``ss_optimizer`` metadata value: ``module.Class(args)``."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.class_path}({args})" if args else self.class_path

    @property
    def adapts_lr(self) -> bool:
        """D-Adaptation and Prodigy: the learning rate is a multiplier of an estimated step size ``d``."""
        return self.cls.__name__.lower().startswith(("dadapt", "prodigy"))

    @property
    def schedule_free(self) -> bool:
        return self.cls.__name__.lower().endswith("schedulefree")


def _import(spec: OptimizerSpec, kind: str) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        if spec.package and e.name and spec.module.startswith(e.name):
            raise ArgumentError(f"--optimizer_type {kind} needs the {spec.package} package: "
                                f"pip install {spec.package}") from e
        raise ArgumentError(f"--optimizer_type {kind}: cannot import {spec.module} ({e}); is the package that "
                            "provides it installed?") from e
    except Exception as e:  # e.g. bitsandbytes installed without a usable GPU backend
        raise ArgumentError(f"--optimizer_type {kind}: importing {spec.module} failed ({e})") from e
    try:
        return getattr(module, spec.attr)
    except AttributeError as e:
        raise ArgumentError(f"--optimizer_type {kind}: {spec.path} does not exist in the installed "
                            f"{spec.package or spec.module} (too old?)") from e


def _torch_optimizer(name: str) -> type | None:
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == name.lower() and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return obj
    return None


def optimizer_type_from_args(args) -> str:
    """``--optimizer_type`` after the legacy switches (``--use_8bit_adam``, ``--use_lion_optimizer``)."""
    kind = (getattr(args, "optimizer_type", "") or "").strip()
    legacy = [(flag, name) for flag, name in LEGACY_FLAGS.items() if getattr(args, flag, False)]
    if len(legacy) > 1:
        raise ArgumentError("--use_8bit_adam and --use_lion_optimizer cannot be combined")
    if legacy:
        flag, name = legacy[0]
        if kind and kind.lower() != name.lower():
            raise ArgumentError(f"--{flag} conflicts with --optimizer_type {kind}: use only --optimizer_type")
        return name
    return kind or "AdamW"


def choose_optimizer(args) -> OptimizerChoice:
    """Resolve the optimizer class and kwargs; fails before any model work when a package is missing.

    AdaFactor with ``relative_step`` (its default) sets ``args.lr_scheduler`` to ``adafactor:<lr>``.
    """
    kind = optimizer_type_from_args(args)
    kwargs = parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    spec = _BY_LOWER.get(kind.lower())
    if spec is not None:
        cls = _import(spec, kind)
        kwargs = {**spec.defaults, **kwargs}
    elif "." in kind:
        module, _, attr = kind.rpartition(".")
        cls = _import(OptimizerSpec(module, attr), kind)
    else:
        cls = _torch_optimizer(kind)
        if cls is None:
            known = ", ".join(OPTIMIZERS)
            raise ArgumentError(f"--optimizer_type {kind}: unknown optimizer (known names: {known}; or a class of "
                                "torch.optim, or a dotted class path such as pytorch_optimizer.CAME)")
    choice = OptimizerChoice(kind, cls, kwargs)
    if cls.__module__.startswith("transformers") and cls.__name__ == "Adafactor":
        _adafactor_rules(args, choice)
    if choice.adapts_lr:
        _check_adaptive_lr(args, kind)
    return choice


def _adafactor_rules(args, choice: OptimizerChoice) -> None:
    choice.kwargs.setdefault("relative_step", True)
    if not choice.kwargs["relative_step"]:
        if not str(args.lr_scheduler).startswith("adafactor"):
            return
        raise ArgumentError("--lr_scheduler adafactor works only with AdaFactor's relative_step=True")
    choice.pass_lr = False
    logger.info("AdaFactor relative_step=True: --learning_rate %s is the initial learning rate", args.learning_rate)
    if getattr(args, "unet_lr", None) is not None or getattr(args, "text_encoder_lr", None):
        logger.warning("AdaFactor relative_step=True computes its own step size: --unet_lr / --text_encoder_lr "
                       "have no effect (set relative_step=False in --optimizer_args to use them)")
    if not str(args.lr_scheduler).startswith("adafactor"):
        if args.lr_scheduler != "constant" or getattr(args, "lr_scheduler_type", None):
            logger.warning("AdaFactor relative_step=True uses its own schedule: --lr_scheduler %s is replaced by "
                           "adafactor:%s", args.lr_scheduler_type or args.lr_scheduler, args.learning_rate)
        args.lr_scheduler = f"adafactor:{args.learning_rate}"
        if getattr(args, "lr_scheduler_type", None):
            args.lr_scheduler_type = ""


def _check_adaptive_lr(args, kind: str) -> None:
    lrs = {args.learning_rate, getattr(args, "unet_lr", None), *(getattr(args, "text_encoder_lr", None) or [])}
    lrs.discard(None)
    if args.learning_rate <= 0.1:
        logger.warning("--optimizer_type %s estimates the step size itself; --learning_rate is a multiplier and "
                       "is usually 1.0 (got %s)", kind, args.learning_rate)
    if len(lrs) > 1:
        logger.warning("--optimizer_type %s with several learning rates (%s): each is a multiplier of the same "
                       "estimated step size", kind, ", ".join(map(str, sorted(lrs))))


def make_optimizer(choice: OptimizerChoice, params, lr: float) -> torch.optim.Optimizer:
    kwargs = dict(choice.kwargs)
    if choice.pass_lr:
        kwargs["lr"] = lr
    else:
        kwargs["lr"] = None  # transformers' Adafactor refuses an lr together with relative_step=True
    try:
        optimizer = choice.cls(params, **kwargs)
    except TypeError as e:
        raise ArgumentError(f"--optimizer_args for {choice.name}: {e}") from e
    if is_schedule_free(optimizer):
        optimizer.train()  # schedule-free optimizers step only in train mode
    return optimizer


# ============================================================== schedule-free train/eval switching
def is_schedule_free(optimizer) -> bool:
    """A schedule-free optimizer (schedulefree's or any ``*ScheduleFree`` class), even inside accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner).__name__.lower().endswith("schedulefree"):
        return True
    groups = getattr(inner, "param_groups", None) or []
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(inner, "eval", None))


def _in_train_mode(optimizer) -> bool:
    groups = getattr(optimizer, "param_groups", None) or []
    return bool(groups) and bool(groups[0].get("train_mode", True))


@contextlib.contextmanager
def optimizer_eval_mode(optimizer) -> Iterator[None]:
    """Parameters at their evaluation point while inside: a schedule-free optimizer is switched to
    ``eval()`` (the averaged weights) and back to ``train()``; any other optimizer (or None) is untouched."""
    switch = optimizer is not None and is_schedule_free(optimizer) and _in_train_mode(optimizer)
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()


def optimizer_train_mode(optimizer) -> None:
    """Make sure a schedule-free optimizer can step (e.g. after a state saved in eval mode was loaded)."""
    if optimizer is not None and is_schedule_free(optimizer) and not _in_train_mode(optimizer):
        optimizer.train()


# ====================================================================================== logging
def lr_log_values(optimizer, lr_scheduler, names: list[str] | None) -> dict[str, float]:
    """``lr/<name>`` per parameter group, plus ``lr/d*lr/<name>`` (= d × lr) for D-Adaptation / Prodigy."""
    lrs = list(lr_scheduler.get_last_lr()) if lr_scheduler is not None else \
        [g["lr"] for g in optimizer.param_groups]
    names = names if names and len(names) == len(lrs) else [f"group{i}" for i in range(len(lrs))]
    logs = {f"lr/{name}": float(lr) for name, lr in zip(names, lrs)}
    groups = getattr(optimizer, "param_groups", None) or []
    for name, group in zip(names, groups):
        if "d" in group and group.get("lr") is not None:
            logs[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
    return logs
