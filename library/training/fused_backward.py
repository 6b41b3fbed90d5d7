"""``--fused_backward_pass`` and ``--fused_optimizer_groups``: optimizer steps inside ``backward()``.

A full fine-tune holds weights + gradients + optimizer state. Both options step the optimizer from
``Tensor.register_post_accumulate_grad_hook`` hooks while ``backward()`` runs and free the gradients
right away, so only part of the gradients is ever alive:

``mode="fused_backward"`` (``--fused_backward_pass``)
    One optimizer over all parameters (its ``state_dict`` has the same layout as in plain training).
    When a parameter's gradient is complete, the optimizer steps *that parameter only* (the
    optimizer's ``param_groups`` are narrowed to it for the call) and the gradient is set to None:
    about one gradient is alive at a time.

``mode="groups"`` (``--fused_optimizer_groups N``)
    The parameters are cut into at most N contiguous groups of about equal size, counted from the
    last parameter (gradients become ready roughly in reverse registration order), each with its own
    optimizer (and LR scheduler). When every hooked parameter of a group has its gradient, that
    group's optimizer steps and zeroes them: about 1/N of the gradients are alive at a time.

Equivalence (what the tests check, bitwise on CPU):

- ``fused_backward`` == per step: clip each parameter's gradient alone to ``max_grad_norm`` (when > 0),
  ``optimizer.step()``, ``zero_grad()``. This holds for optimizers whose update of a parameter reads
  only its own gradient, state and group hyperparameters (Adafactor, AdamW, SGD, Lion, ...), not
  for ones with a global statistic (D-Adaptation, Prodigy).
- ``groups`` == N independent optimizers over the groups, each stepped after ``backward()`` with its
  gradients clipped to ``max_grad_norm`` by the norm of *that group*. For per-parameter optimizers
  without clipping, or with N = 1, this equals the plain loop with one optimizer and the global norm.

``--max_grad_norm``: the global norm needs every gradient at once, which is what these modes avoid,
so the clipping is per parameter (fused_backward) or per group (groups), as a documented
approximation rather than a refusal (the flag defaults to 1.0). Adafactor bounds its own update as
well (``clip_threshold`` on the update's RMS). ``--max_grad_norm 0`` turns clipping off.

Not supported (``check_fused_args`` refuses them): gradient accumulation (a hook would step at every
micro-batch), fp16 mixed precision (the GradScaler must unscale and check all gradients for inf
before any step), DeepSpeed and several processes (DDP all-reduces gradients after the hooks fire).

Trainer use (instead of ``make_optimizer``/``make_lr_scheduler`` and, per step, of the
``clip_grad_norm_`` call and ``optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()``)::

    fused = fused_from_args(args, params, choice, total_steps=max_train_steps * num_processes,
                            num_processes=accelerator.num_processes)   # None: neither flag given
    # or: FusedBackward.create(params, choice, mode=..., num_groups=..., lr=args.learning_rate,
    #         max_grad_norm=args.max_grad_norm, lr_scheduler_factory=lambda o: make_lr_scheduler(args, o, total))
    accelerator.register_for_checkpointing(fused)   # its optimizers/schedulers are not accelerator.prepare'd
    ...
    accelerator.backward(loss)    # the optimizers step in here
    fused.finish_step()           # leftover groups step, then every LR scheduler steps once
    logs = fused.lr_log_values(lr_names)             # instead of lr_log_values(optimizer, lr_scheduler, names)
    with fused.eval_mode(): ...                      # instead of optimizer_eval_mode(optimizer)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch.optim import Optimizer

from library.args import ArgumentError
from library.training.optimizers import (OptimizerChoice, lr_log_values, make_optimizer, optimizer_eval_mode,
                                         optimizer_train_mode, optimizer_type_from_args)

logger = logging.getLogger(__name__)

Mode = Literal["fused_backward", "groups"]
#: builds one optimizer from a list of param-group dicts (``{"params": [...], "lr": ..., ...}``)
OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
#: builds the LR scheduler of one optimizer, e.g. ``lambda opt: make_lr_scheduler(args, opt, total_steps)``
SchedulerFactory = Callable[[Optimizer], Any]

#: --optimizer_type spellings that mean transformers' Adafactor (compared lower-case)
_ADAFACTOR_NAMES = {"adafactor", "transformers.optimization.adafactor", "transformers.adafactor"}


# ================================================================================ flag validation
def check_fused_args(args, num_processes: int = 1) -> Mode | None:
    """Validate ``--fused_backward_pass`` / ``--fused_optimizer_groups``; the mode to use, or None.

    Raises ``ArgumentError`` naming the flag for: both at once, ``--fused_optimizer_groups`` below 1,
    ``--fused_backward_pass`` with an optimizer other than AdaFactor, and for either with
    ``--gradient_accumulation_steps`` > 1, fp16 (``--mixed_precision fp16`` / ``--full_fp16``),
    ``--deepspeed`` or more than one process.
    """
    fused = bool(getattr(args, "fused_backward_pass", False))
    groups = getattr(args, "fused_optimizer_groups", None)
    if groups is not None and groups < 1:
        raise ArgumentError(f"--fused_optimizer_groups must be at least 1 (got {groups}); leave it out to step "
                            "the optimizer after backward as usual")
    if not fused and groups is None:
        return None
    if fused and groups is not None:
        raise ArgumentError("--fused_backward_pass and --fused_optimizer_groups cannot be combined; choose one")
    flag = "--fused_backward_pass" if fused else "--fused_optimizer_groups"
    if fused:
        kind = optimizer_type_from_args(args)
        if kind.lower() not in _ADAFACTOR_NAMES:
            raise ArgumentError(f"--fused_backward_pass works only with --optimizer_type AdaFactor (got {kind}); "
                                "use --fused_optimizer_groups N for other optimizers")
    accum = getattr(args, "gradient_accumulation_steps", 1) or 1
    if accum > 1:
        raise ArgumentError(f"{flag} steps the optimizer inside backward(), so it needs "
                            f"--gradient_accumulation_steps 1 (got {accum})")
    if getattr(args, "mixed_precision", "no") == "fp16" or getattr(args, "full_fp16", False):
        raise ArgumentError(f"{flag} cannot be used with fp16 (--mixed_precision fp16 / --full_fp16): the gradient "
                            "scaler has to check all gradients before any step; use --mixed_precision bf16 or no")
    if getattr(args, "deepspeed", False):
        raise ArgumentError(f"{flag} cannot be combined with --deepspeed")
    if num_processes > 1:
        raise ArgumentError(f"{flag} works in a single process only (got {num_processes}): with several, the "
                            "optimizer would step before the gradients are averaged across processes")
    max_norm = getattr(args, "max_grad_norm", 0.0) or 0.0
    if max_norm:
        logger.info("%s: --max_grad_norm %s clips each %s by its own norm (the global norm needs all gradients)",
                    flag, max_norm, "parameter" if fused else "group")
    return "fused_backward" if fused else "groups"


# ===================================================================================== the engine
@dataclass
class _Chunk:
    """One optimizer of ``groups`` mode and the bookkeeping of its gradients in the current backward."""

    optimizer: Optimizer
    params: list[torch.Tensor]          # every parameter the optimizer holds (frozen ones included)
    expected: frozenset[int]            # ids of the hooked (requires_grad) parameters
    ready: set[int] = field(default_factory=set)


class FusedBackward:
    """Optimizers that step from gradient hooks during ``backward()``; see the module docstring.

    Attributes: ``mode``, ``optimizers`` (one for ``fused_backward``, one per group for ``groups``),
    ``lr_schedulers`` (one per optimizer, empty without a factory), ``max_grad_norm``.
    Build it with :meth:`create`.
    """

    def __init__(self, mode: Mode, chunks: list[_Chunk], lr_schedulers: list[Any], max_grad_norm: float,
                 group_index: list[tuple[int, int]]):
        self.mode = mode
        self._chunks = chunks
        self.optimizers: list[Optimizer] = [c.optimizer for c in chunks]
        self.lr_schedulers = lr_schedulers
        self.max_grad_norm = float(max_grad_norm or 0.0)
        # original param group i -> (optimizer, group there) holding the group's first parameter
        self._group_index = group_index
        # Hooks of parameters on different devices may run on different autograd threads; the
        # narrowing of param_groups and the ready-sets must not interleave.
        self._lock = threading.Lock()
        self._handles: list[Any] = []

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def create(cls, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
               optimizer: OptimizerChoice | OptimizerFactory, *, mode: Mode, num_groups: int | None = None,
               lr: float | None = None, lr_scheduler_factory: SchedulerFactory | None = None,
               max_grad_norm: float = 0.0) -> FusedBackward:
        """Build the optimizer(s) and LR scheduler(s) and register the hooks.

        ``params``: tensors, or param-group dicts as for any torch optimizer (their options, e.g. a
        group's ``lr``, are kept in every optimizer that gets part of the group). ``optimizer``: an
        ``OptimizerChoice`` (built with ``make_optimizer(choice, groups, lr)``; ``lr`` required) or a
        factory ``groups -> Optimizer``. ``num_groups``: required for ``mode="groups"`` (at most that
        many groups are made: fewer when there are fewer parameters or a few very large ones),
        refused for ``"fused_backward"``. ``lr_scheduler_factory(optimizer)`` is called once per
        optimizer. ``max_grad_norm`` > 0: per-parameter / per-group clipping.
        """
        if mode not in ("fused_backward", "groups"):
            raise ValueError(f"FusedBackward mode must be 'fused_backward' or 'groups', not {mode!r}")
        if mode == "fused_backward" and num_groups is not None:
            raise ValueError("num_groups is only for mode='groups' (--fused_optimizer_groups)")
        if mode == "groups" and (num_groups is None or num_groups < 1):
            raise ValueError(f"mode='groups' needs num_groups >= 1 (--fused_optimizer_groups), got {num_groups}")
        build = _optimizer_builder(optimizer, lr)
        groups = _as_groups(params)

        if mode == "fused_backward":
            layout = [[(gi, list(g["params"])) for gi, g in enumerate(groups)]]
        else:
            layout = _split(groups, num_groups)
        chunks, group_index = [], [(-1, -1)] * len(groups)
        for k, parts in enumerate(layout):
            opt_groups = []
            for gi, ps in parts:
                if ps[0] is groups[gi]["params"][0]:  # where the group's first parameter went: what lr logs read
                    group_index[gi] = (k, len(opt_groups))
                opt_groups.append({**{key: v for key, v in groups[gi].items() if key != "params"}, "params": ps})
            chunk_params = [p for _, ps in parts for p in ps]
            chunks.append(_Chunk(build(opt_groups), chunk_params,
                                 frozenset(id(p) for p in chunk_params if p.requires_grad)))
        schedulers = [lr_scheduler_factory(c.optimizer) for c in chunks] if lr_scheduler_factory else []
        fused = cls(mode, chunks, schedulers, max_grad_norm, group_index)
        fused._register()
        if mode == "groups" and len(chunks) < num_groups:
            logger.info("--fused_optimizer_groups %d: %d groups made (too few or too unequal parameters for more)",
                        num_groups, len(chunks))
        return fused

    def _register(self) -> None:
        for chunk in self._chunks:
            if self.mode == "fused_backward":
                for gi, group in enumerate(chunk.optimizer.param_groups):
                    for p in group["params"]:
                        if p.requires_grad:
                            self._handles.append(p.register_post_accumulate_grad_hook(self._param_hook(gi)))
            else:
                for p in chunk.params:
                    if p.requires_grad:
                        self._handles.append(p.register_post_accumulate_grad_hook(self._group_hook(chunk)))

    def remove(self) -> None:
        """Unregister every hook: afterwards ``backward()`` leaves the gradients as usual. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FusedBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------ hooks
    def _param_hook(self, group_index: int) -> Callable[[torch.Tensor], None]:
        optimizer = self.optimizers[0]

        def hook(p: torch.Tensor) -> None:
            with self._lock:
                # Looked up at every call: load_state_dict() replaces the group dicts.
                group = optimizer.param_groups[group_index]
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
                # Narrow the optimizer to this one parameter: its step() then touches only p, in
                # O(1) instead of a walk over every parameter, and with the group dict itself, so
                # the lr the scheduler wrote (and anything the optimizer writes back) is shared.
                all_groups, all_params = optimizer.param_groups, group["params"]
                optimizer.param_groups, group["params"] = [group], [p]
                try:
                    optimizer.step()
                finally:
                    optimizer.param_groups, group["params"] = all_groups, all_params
                p.grad = None  # the memory saving: this gradient is not needed any more

        return hook

    def _group_hook(self, chunk: _Chunk) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            with self._lock:
                chunk.ready.add(id(p))  # a set, not a count: a second backward cannot complete a group early
                if chunk.ready >= chunk.expected:
                    self._step_chunk(chunk)

        return hook

    def _step_chunk(self, chunk: _Chunk) -> None:
        if self.max_grad_norm > 0:
            grads = [p for p in chunk.params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        chunk.optimizer.step()
        chunk.optimizer.zero_grad(set_to_none=True)
        chunk.ready.clear()

    # ------------------------------------------------------------------------------ per step
    def flush(self) -> None:
        """Step every group that got some but not all of its gradients in this backward.

        Parameters that take no part in a forward (a skipped branch) never fire their hook, so
        their group would wait forever; stepping it with what arrived is what the plain loop does
        (the optimizer skips parameters without a gradient). No-op in ``fused_backward`` mode.
        """
        with self._lock:
            for chunk in self._chunks:
                if chunk.ready:
                    self._step_chunk(chunk)

    def step_schedulers(self) -> None:
        """``step()`` every LR scheduler once: call once per optimizer step, after ``backward()``."""
        for scheduler in self.lr_schedulers:
            scheduler.step()

    def finish_step(self) -> None:
        """End of one optimizer step: :meth:`flush`, then :meth:`step_schedulers`."""
        self.flush()
        self.step_schedulers()

    def zero_grad(self) -> None:
        """Drop any gradient still held (none after a normal step) and forget partial groups; no step."""
        with self._lock:
            for chunk in self._chunks:
                chunk.optimizer.zero_grad(set_to_none=True)
                chunk.ready.clear()

    # ---------------------------------------------------------------------------- lr and modes
    def get_last_lr(self) -> list[float]:
        """The learning rate of each parameter group given to :meth:`create`, in that order.

        What the plain loop's ``lr_scheduler.get_last_lr()`` gives, also for transformers'
        ``AdafactorSchedule`` (relative_step): it reads the step size from the gradient-holding
        first parameter of each group when stepped, which no longer holds a gradient here, so that
        step size is computed from the optimizer state of that parameter instead.
        """
        out = []
        for k, j in self._group_index:
            optimizer = self.optimizers[k]
            group = optimizer.param_groups[j]
            scheduler = self.lr_schedulers[k] if self.lr_schedulers else None
            if scheduler is None:
                out.append(float(group["lr"]))
                continue
            state = optimizer.state.get(group["params"][0])
            if type(scheduler).__name__ == "AdafactorSchedule" and state and hasattr(optimizer, "_get_lr"):
                out.append(float(optimizer._get_lr(group, state)))
            else:
                out.append(float(scheduler.get_last_lr()[j]))
        return out

    def lr_log_values(self, names: list[str] | None) -> dict[str, float]:
        """``lr_log_values`` of the plain loop (``lr/<name>``, ``lr/d*lr/<name>``), one entry per original group."""
        groups = [self.optimizers[k].param_groups[j] for k, j in self._group_index]
        lrs = self.get_last_lr()
        return lr_log_values(SimpleNamespace(param_groups=groups), SimpleNamespace(get_last_lr=lambda: lrs), names)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """``optimizer_eval_mode`` over every optimizer (schedule-free: averaged weights inside)."""
        with contextlib.ExitStack() as stack:
            for optimizer in self.optimizers:
                stack.enter_context(optimizer_eval_mode(optimizer))
            yield

    def train_mode(self) -> None:
        """``optimizer_train_mode`` for every optimizer (after a resume)."""
        for optimizer in self.optimizers:
            optimizer_train_mode(optimizer)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: the mode, each optimizer's and each scheduler's ``state_dict``."""
        return {"mode": self.mode, "optimizers": [o.state_dict() for o in self.optimizers],
                "lr_schedulers": [s.state_dict() for s in self.lr_schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the mode and the number of groups must be the ones it was saved with."""
        mode, opts = state.get("mode"), state.get("optimizers", [])
        if mode != self.mode:
            raise ValueError(f"the saved state is from fused mode {mode!r}, this run uses {self.mode!r} "
                             "(--fused_backward_pass / --fused_optimizer_groups must match the saved run)")
        if len(opts) != len(self.optimizers) or len(state.get("lr_schedulers", [])) != len(self.lr_schedulers):
            raise ValueError(f"the saved state has {len(opts)} optimizer groups, this run has {len(self.optimizers)} "
                             "(use the --fused_optimizer_groups of the saved run)")
        for k, (optimizer, saved) in enumerate(zip(self.optimizers, opts)):
            try:
                optimizer.load_state_dict(saved)
            except ValueError as e:
                raise ValueError(f"fused optimizer group {k}: the saved state does not fit ({e}); "
                                 "same model and --fused_optimizer_groups as the saved run?") from e
        for scheduler, saved in zip(self.lr_schedulers, state["lr_schedulers"]):
            scheduler.load_state_dict(saved)


def fused_from_args(args, params, choice: OptimizerChoice, *, total_steps: int,
                    num_processes: int = 1) -> FusedBackward | None:
    """The trainer's one call: ``check_fused_args`` then :meth:`FusedBackward.create` from the flags.

    None when neither flag is given (train with ``make_optimizer`` as usual). ``total_steps`` is what
    ``make_lr_scheduler`` gets (max_train_steps × processes).
    """
    mode = check_fused_args(args, num_processes)
    if mode is None:
        return None
    from library.training.lr_schedulers import make_lr_scheduler

    return FusedBackward.create(
        params, choice, mode=mode, num_groups=args.fused_optimizer_groups if mode == "groups" else None,
        lr=args.learning_rate, max_grad_norm=getattr(args, "max_grad_norm", 0.0) or 0.0,
        lr_scheduler_factory=lambda optimizer: make_lr_scheduler(args, optimizer, total_steps))


# ================================================================================== helpers
def _optimizer_builder(optimizer: OptimizerChoice | OptimizerFactory, lr: float | None) -> OptimizerFactory:
    if isinstance(optimizer, OptimizerChoice):
        if lr is None:
            raise ValueError("FusedBackward.create with an OptimizerChoice needs lr= (the --learning_rate)")
        return lambda groups: make_optimizer(optimizer, groups, lr)
    if not callable(optimizer):
        raise TypeError(f"optimizer must be an OptimizerChoice or a factory groups -> Optimizer, not "
                        f"{type(optimizer).__name__}")
    return optimizer


def _as_groups(params) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("FusedBackward.create: no parameters to optimize")
    if all(isinstance(x, dict) for x in items):
        groups = [{**g, "params": list(g["params"])} for g in items]
    elif all(isinstance(x, torch.Tensor) for x in items):
        groups = [{"params": items}]
    else:
        raise TypeError("params must be all tensors or all param-group dicts")
    for i, g in enumerate(groups):
        if not g["params"]:
            raise ValueError(f"FusedBackward.create: parameter group {i} has no parameters")
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("FusedBackward.create: no parameter requires a gradient")
    return groups


def _split(groups: list[dict[str, Any]], num_groups: int) -> list[list[tuple[int, list[torch.Tensor]]]]:
    """Contiguous chunks of about equal element count, counted from the last parameter.

    A parameter goes to the chunk in which its middle element falls, so a chunk is never cut through
    a parameter and one huge parameter leaves chunks empty (dropped) rather than unbalancing the rest.
    Frozen parameters weigh nothing; within a chunk the registration order is kept (for N = 1 the
    optimizer is laid out exactly as the plain one). Returns per chunk ``[(group index, params)]``,
    chunk 0 being the one whose gradients come first (the end of the model).
    """
    flat = [(gi, p) for gi, g in enumerate(groups) for p in g["params"]]
    sizes = [p.numel() if p.requires_grad else 0 for _, p in flat]
    total = sum(sizes)
    members: list[list[int]] = [[] for _ in range(num_groups)]
    seen = 0
    for i in reversed(range(len(flat))):
        k = min(num_groups - 1, int((seen + sizes[i] / 2) * num_groups / total))
        members[k].append(i)
        seen += sizes[i]
    kept: list[list[int]] = []
    orphans: list[int] = []  # a chunk with nothing trainable is dropped; its frozen ones join the next
    for idx in members:
        if any(sizes[i] for i in idx):
            kept.append(idx + orphans)
            orphans = []
        else:
            orphans.extend(idx)
    kept[-1].extend(orphans)
    layout = []
    for idx in kept:
        parts: list[tuple[int, list[torch.Tensor]]] = []
        for i in sorted(idx):
            gi, p = flat[i]
            if parts and parts[-1][0] == gi:
                parts[-1][1].append(p)
            else:
                parts.append((gi, [p]))
        layout.append(parts)
    return layout


class FusedOptimizerView:
    """A :class:`FusedBackward` as the training loop's ``optimizer``: the updates already happened in
    ``backward()``, so ``step()`` only steps groups still waiting and ``zero_grad()`` has nothing to do."""

    def __init__(self, fused: FusedBackward) -> None:
        self.fused = fused

    def step(self) -> None:
        self.fused.flush()

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - the optimizer API
        """Nothing to clear: each gradient was freed right after its update."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [self.fused.optimizers[k].param_groups[j] for k, j in self.fused._group_index]


class FusedSchedulerView:
    """A :class:`FusedBackward`'s LR schedulers as the training loop's one ``lr_scheduler``."""

    def __init__(self, fused: FusedBackward) -> None:
        self.fused = fused

    def step(self) -> None:
        self.fused.step_schedulers()

    def get_last_lr(self) -> list[float]:
        return self.fused.get_last_lr()
