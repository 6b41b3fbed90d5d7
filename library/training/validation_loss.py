"""Validation loss: the denoising loss on held-out images at fixed timesteps and fixed noise.

(Not to be confused with :mod:`library.training.validation`, the check of flag combinations.)

A validation pass runs over the first ``--max_validation_steps`` batches of the validation group
(all of them when unset); each batch is evaluated at :data:`NUM_VALIDATION_TIMESTEPS` fixed
timesteps spread evenly inside ``[--min_timestep or 0, --max_timestep or 1000]`` (200, 400, 600,
800 by default) with noise drawn from a generator seeded by ``--validation_seed`` (or ``--seed``).
The same images, captions, timesteps and noise are used by every pass, so two runs with the same
seed log the same numbers and a pass's value moves only because the network changed.

Contracts:

- A pass runs under ``torch.no_grad()`` with the denoiser, text encoders and network in eval mode,
  and leaves the global RNG state (torch CPU and CUDA, Python ``random``, NumPy) exactly as it
  found it: training with validation is bit-identical to training without it.
- The validation batches are those of epoch 1 of the validation group every time (augmentation
  and caption randomness fixed), with token warmup finished.
- The loss of one (batch, timestep) is the mean squared error of prediction and target; a pass's
  value is the mean over all its (batch, timestep) pairs.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: timesteps evaluated per validation batch
NUM_VALIDATION_TIMESTEPS = 4
#: the timestep range when neither --min_timestep nor --max_timestep is given
DEFAULT_TIMESTEP_RANGE = (0, 1000)


def validation_timesteps(min_timestep: int | None = None, max_timestep: int | None = None,
                         count: int = NUM_VALIDATION_TIMESTEPS) -> list[int]:
    """The ``count`` interior points of an even split of ``[min_timestep, max_timestep]``.

    ``count + 2`` evenly spaced points from the lower to the upper bound, both ends dropped, each
    rounded to the nearest integer timestep: (0, 1000) -> [200, 400, 600, 800]. ``None`` bounds
    mean 0 and 1000.
    """
    low = DEFAULT_TIMESTEP_RANGE[0] if min_timestep is None else int(min_timestep)
    high = DEFAULT_TIMESTEP_RANGE[1] if max_timestep is None else int(max_timestep)
    if high < low:
        raise ValueError(f"--max_timestep {high} is below --min_timestep {low}")
    points = torch.linspace(low, high, count + 2, dtype=torch.float64)[1:-1]
    return [int(round(p)) for p in points.tolist()]


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the block, then put every global RNG (torch CPU/CUDA, ``random``, NumPy) back as it was."""
    py_state = random.getstate()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        np = None
    np_state = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if np is not None:
            np.random.set_state(np_state)


@dataclass(frozen=True)
class ValidationSettings:
    """When and how validation runs, from the ``--validat*`` / ``--max_validation_steps`` flags."""

    seed: int
    timesteps: tuple[int, ...]
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    max_steps: int | None = None

    @classmethod
    def from_args(cls, args) -> "ValidationSettings":
        seed = args.validation_seed if getattr(args, "validation_seed", None) is not None else args.seed
        return cls(seed=int(seed),
                   timesteps=tuple(validation_timesteps(getattr(args, "min_timestep", None),
                                                        getattr(args, "max_timestep", None))),
                   every_n_steps=getattr(args, "validate_every_n_steps", None),
                   every_n_epochs=getattr(args, "validate_every_n_epochs", None),
                   max_steps=getattr(args, "max_validation_steps", None))

    def due_at_step(self, step: int) -> bool:
        """A pass after optimizer step ``step`` (only with ``--validate_every_n_steps``)."""
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def due_at_epoch_end(self, epoch: int) -> bool:
        """A pass after epoch ``epoch`` (counted from 1): every epoch unless ``--validate_every_n_epochs``."""
        return not self.every_n_epochs or epoch % self.every_n_epochs == 0


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample: [B, ...] x [B, ...] -> [B] (float32)."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return loss.mean(dim=list(range(1, loss.ndim)))


#: noise for model-space latents of the given shape (float32, CPU)
NoiseFn = Callable[[torch.Size], torch.Tensor]
#: ``(batch, timesteps, noise_fn) -> one loss per timestep``
BatchLosses = Callable[[dict, "tuple[int, ...]", NoiseFn], "list[float]"]


def family_batch_losses(family, models, args, accelerator,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_per_sample,
                        loss_config=None, weight_dtype: torch.dtype | None = None) -> BatchLosses:
    """The loss of one validation batch at each of the given timesteps, through the family API.

    Latents (cached or VAE-encoded) and text conditioning (from the text encoders, or from the
    batch's cached ``text_encoder_outputs`` cast to ``weight_dtype``, by default the
    ``--mixed_precision`` one) are computed once per batch; then for
    each timestep ``family.predict(..., timesteps=, noise=)`` is run with fresh noise from
    ``noise_fn``. With ``loss_config`` (the trainer passes its own) the loss is exactly the
    training loss (``--loss_type``, masks, SNR weightings), so the two curves are comparable;
    otherwise ``loss_fn`` per sample times the batch's loss weights.
    """
    from library.training.loss import prediction_loss

    device = accelerator.device

    def conditioning_of(batch: dict):
        if batch.get("text_encoder_outputs") is None:
            return family.encode_text(models, batch, args)
        dtype = weight_dtype
        if dtype is None:
            from library.training.accelerator import weight_dtypes

            dtype = weight_dtypes(args)[0]
        return family.conditioning_from_cache(models, batch["text_encoder_outputs"], args, device, dtype)

    def losses(batch: dict, timesteps: tuple[int, ...], noise_fn: NoiseFn) -> list[float]:
        if batch.get("latents") is not None:
            latents = batch["latents"].to(device)
        else:
            latents = family.encode_images(models, batch["images"].to(device))
        latents = torch.nan_to_num(latents.float())
        weights = batch["loss_weights"].to(device).float()
        out = []
        with accelerator.autocast():
            conditioning = conditioning_of(batch)
            for t in timesteps:
                noise = noise_fn(latents.shape).to(device)
                steps = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
                prediction = family.predict(models, latents, conditioning, batch, args, timesteps=steps, noise=noise)
                if loss_config is not None:
                    loss = prediction_loss(prediction, loss_config, loss_weights=weights,
                                           masks=batch.get("alpha_masks"))
                else:
                    loss = (loss_fn(prediction.pred, prediction.target) * weights).mean()
                out.append(float(loss))
        return out

    return losses


@dataclass
class ValidationRunner:
    """Computes validation passes and logs them.

    ``batches()`` yields the validation batches in a fixed order; ``batch_losses`` evaluates one
    batch at the fixed timesteps (see :func:`family_batch_losses`); ``eval_context()`` puts the
    models in eval mode for the pass and restores their modes afterwards.
    """

    settings: ValidationSettings
    batches: Callable[[], Iterable[dict]]
    batch_losses: BatchLosses
    eval_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    history: list[tuple[str, int, float]] = field(default_factory=list)

    def compute(self) -> float:
        """One validation pass: mean loss over (batch, timestep); global RNG state untouched."""
        generator = torch.Generator(device="cpu").manual_seed(self.settings.seed)

        def noise_fn(shape: torch.Size) -> torch.Tensor:
            return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)

        values: list[float] = []
        with preserved_rng_state(), torch.no_grad(), self.eval_context():
            for index, batch in enumerate(self.batches()):
                if self.settings.max_steps is not None and index >= self.settings.max_steps:
                    break
                values.extend(self.batch_losses(batch, self.settings.timesteps, noise_fn))
        return sum(values) / len(values) if values else float("nan")

    def run(self, *, kind: str, step: int, train_loss: float,
            log: Callable[[dict, int], None] | None) -> float:
        """Compute a pass and log ``loss/validation/<kind>_average`` and ``..._divergence`` at ``step``.

        ``kind`` is ``"step"`` (``step`` = the global step, ``train_loss`` = the moving training
        average) or ``"epoch"`` (``step`` = the epoch, ``train_loss`` = the epoch's mean loss).
        Divergence = validation - training.
        """
        value = self.compute()
        self.history.append((kind, step, value))
        logger.info("validation loss (%s %d): %.4f (training %.4f)", kind, step, value, train_loss)
        if log is not None:
            log({f"loss/validation/{kind}_average": value,
                 f"loss/validation/{kind}_divergence": value - train_loss}, step)
        return value
