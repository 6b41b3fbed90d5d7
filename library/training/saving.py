"""When and under which names models and training states are saved, and which old ones go.

File names match kohya-ss/sd-scripts so users' scripts that pick up results keep working:
``<name>.<ext>`` (final), ``<name>-<epoch:06d>.<ext>``, ``<name>-step<step:08d>.<ext>`` and the
state folders ``<name>-state``, ``<name>-<epoch:06d>-state``, ``<name>-step<step:08d>-state``
holding ``train_state.json``. Without ``--output_name`` the names are ``last``, ``epoch`` and ``at``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"


@dataclass(frozen=True)
class SavePolicy:
    output_dir: Path
    output_name: str | None
    ext: str  # with the dot: ".safetensors"
    every_n_epochs: int | None
    every_n_steps: int | None
    last_n_epochs: int | None
    last_n_epochs_state: int | None
    last_n_steps: int | None
    last_n_steps_state: int | None
    save_state: bool
    save_state_on_train_end: bool

    @classmethod
    def from_args(cls, args, num_train_epochs: int) -> "SavePolicy":
        every_n_epochs = args.save_every_n_epochs
        if args.save_n_epoch_ratio:
            every_n_epochs = max(1, num_train_epochs // args.save_n_epoch_ratio)
        return cls(
            output_dir=Path(args.output_dir),
            output_name=args.output_name,
            ext=model_extension(args.save_model_as),
            every_n_epochs=every_n_epochs,
            every_n_steps=args.save_every_n_steps,
            last_n_epochs=args.save_last_n_epochs,
            last_n_epochs_state=args.save_last_n_epochs_state if args.save_last_n_epochs_state is not None else args.save_last_n_epochs,
            last_n_steps=args.save_last_n_steps,
            last_n_steps_state=args.save_last_n_steps_state if args.save_last_n_steps_state is not None else args.save_last_n_steps,
            save_state=args.save_state,
            save_state_on_train_end=args.save_state_on_train_end,
        )

    # --- names ---------------------------------------------------------------------------------
    def final_stem(self) -> str:
        return self.output_name or "last"

    def epoch_stem(self, epoch: int) -> str:
        return f"{self.output_name or 'epoch'}-{epoch:06d}"

    def step_stem(self, step: int) -> str:
        return f"{self.output_name or 'at'}-step{step:08d}"

    def model_path(self, stem: str) -> Path:
        return self.output_dir / f"{stem}{self.ext}"

    def state_dir(self, stem: str) -> Path:
        return self.output_dir / f"{stem}-state"

    # --- when ----------------------------------------------------------------------------------
    def saves_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def saves_at_epoch_end(self, epoch: int, num_train_epochs: int) -> bool:
        """``epoch`` counts from 1; the last epoch is covered by the final save."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < num_train_epochs

    # --- pruning -------------------------------------------------------------------------------
    def stale_epoch(self, epoch: int, keep: int | None) -> int | None:
        if not keep or not self.every_n_epochs:
            return None
        old = epoch - self.every_n_epochs * keep
        return old if old > 0 else None

    def stale_step(self, step: int, keep: int | None) -> int | None:
        if not keep or not self.every_n_steps:
            return None
        old = step - keep - 1
        old -= old % self.every_n_steps
        return old if old > 0 else None

    def prune_after_epoch_save(self, epoch: int) -> None:
        old = self.stale_epoch(epoch, self.last_n_epochs)
        if old is not None:
            _remove(self.model_path(self.epoch_stem(old)))
        old = self.stale_epoch(epoch, self.last_n_epochs_state)
        if old is not None:
            _remove(self.state_dir(self.epoch_stem(old)))

    def prune_after_step_save(self, step: int) -> None:
        old = self.stale_step(step, self.last_n_steps)
        if old is not None:
            _remove(self.model_path(self.step_stem(old)))
        old = self.stale_step(step, self.last_n_steps_state)
        if old is not None:
            _remove(self.state_dir(self.step_stem(old)))


def model_extension(save_model_as: str | None) -> str:
    """``.safetensors``/``.ckpt``/``.pt``; Diffusers saves are folders named by the stem alone."""
    fmt = save_model_as or "safetensors"
    return "" if fmt.startswith("diffusers") else "." + fmt


def _remove(path: Path) -> None:
    if path.is_dir():
        logger.info("removing old state %s", path)
        shutil.rmtree(path)
    elif path.exists():
        logger.info("removing old model %s", path)
        path.unlink()


def write_train_state(state_dir: str | os.PathLike, *, epoch: int, step: int, optimizer: str | None = None) -> None:
    """``train_state.json``: where the run stands, and (``optimizer``, a class path) which optimizer
    class wrote the state's optimizer file, so a resume with another one is refused in words."""
    data: dict[str, object] = {"current_epoch": epoch, "current_step": step}
    if optimizer:
        data["optimizer"] = optimizer
    with atomic_path(Path(state_dir) / TRAIN_STATE_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)


def saved_optimizer(state_dir: str | os.PathLike) -> str | None:
    """The optimizer class path a state was saved with; None for states that do not say (older ones,
    kohya-ss/sd-scripts' ones)."""
    try:
        value = json.loads((Path(state_dir) / TRAIN_STATE_FILE).read_text(encoding="utf-8")).get("optimizer")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def read_train_state(state_dir: str | os.PathLike) -> tuple[int, int]:
    """(epoch, step) stored in a state folder; an error names the folder if it is not one."""
    path = Path(state_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume {state_dir}: no {TRAIN_STATE_FILE} there; give a '-state' folder written with --save_state"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return int(data["current_epoch"]), int(data["current_step"])
