"""Network options the trainer applies around the network: ``--base_weights`` and ``--scale_weight_norms``.

* :func:`merge_base_weights` merges other LoRA files into the base model before the trained
  network is created (kohya step 4 of the loop), so the new LoRA learns on top of them.
* :class:`MaxNormLog` keeps the per-step results of ``apply_max_norm_regularization`` on the
  device and reads them back in blocks, like :class:`~library.training.loss_log.LossLog` does for
  the loss: max-norm runs after every optimizer step, but a ``.item()`` per step would make the
  host wait for the accelerator each step, while the numbers are only needed for the log.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from library.args import ArgumentError

logger = logging.getLogger(__name__)

__all__ = ["base_weight_multipliers", "merge_base_weights", "MaxNormLog"]


def base_weight_multipliers(files: Sequence[str], multipliers: Sequence[float] | None) -> list[float]:
    """One multiplier per ``--base_weights`` file: given ones in order, 1.0 for the rest.

    More multipliers than files is an error (it is almost certainly a mistake in the command line).
    """
    given = list(multipliers or [])
    if len(given) > len(files):
        raise ArgumentError(f"--base_weights_multiplier has {len(given)} values but --base_weights names "
                            f"{len(files)} files; give at most one multiplier per file")
    return given + [1.0] * (len(files) - len(given))


def merge_base_weights(module: Any, files: Sequence[str], multipliers: Sequence[float] | None, vae: Any,
                       text_encoders: Any, denoiser: Any, weight_dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
    """Add ``multiplier * ΔW`` of each LoRA file to the base models' weights, in order.

    ``module`` is the ``--network_module`` (its ``create_network_from_weights`` shapes a network
    like the file; ``merge_to`` adds it into the layers). The temporary networks are dropped
    afterwards, so nothing of them is trained or saved. A file that does not fit the models
    raises :class:`ArgumentError` naming the file, with the loader's explanation.
    """
    if not files:
        return
    if not hasattr(module, "create_network_from_weights"):
        raise ArgumentError(f"--base_weights: --network_module {module.__name__} has no create_network_from_weights")
    for path, multiplier in zip(files, base_weight_multipliers(files, multipliers)):
        try:
            network, weights_sd = module.create_network_from_weights(multiplier, path, vae, text_encoders, denoiser,
                                                                     for_inference=True)
            network.merge_to(text_encoders, denoiser, weights_sd, weight_dtype, device)
        except (ValueError, FileNotFoundError) as e:
            raise ArgumentError(f"--base_weights {path}: {e}") from e
        del network, weights_sd  # the merged deltas live in the base weights now
        logger.info("merged --base_weights %s with multiplier %g into the base model", path, multiplier)


class MaxNormLog:
    """Collects ``(keys_scaled, mean_norm, max_norm)`` per step and logs them as ``max_norm/*``.

    ``add`` only stores the (device) values; every ``flush_every`` steps (and on :meth:`flush`)
    they are copied to the host in one transfer and passed to ``log`` with their own step
    numbers. Plain Python numbers (from other network modules) are accepted as well.
    """

    def __init__(self, log: Callable[[dict, int], None], *, flush_every: int = 10):
        self._log = log
        self.flush_every = max(1, flush_every)
        self._pending: list[tuple[int, tuple[Any, Any, Any]]] = []

    def add(self, values: tuple[Any, Any, Any], step: int) -> None:
        self._pending.append((step, tuple(values)))  # type: ignore[arg-type]
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        flat = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                for _, values in self._pending for v in values]
        if len({v.device for v in flat}) == 1:
            numbers = torch.stack(flat).tolist()  # the one host sync per block
        else:
            numbers = [float(v) for v in flat]
        for index, (step, _) in enumerate(self._pending):
            keys_scaled, mean_norm, max_norm = numbers[3 * index: 3 * index + 3]
            self._log({"max_norm/keys_scaled": int(keys_scaled), "max_norm/average_key_norm": mean_norm,
                       "max_norm/max_key_norm": max_norm}, step)
        self._pending.clear()
