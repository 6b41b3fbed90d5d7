"""Building a DiT (FLUX.1, SD3) from a checkpoint's state dict, as both families' loaders do."""

from __future__ import annotations

import logging
from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

from library.families.sd.checkpoint.common import CheckpointError

M = TypeVar("M", bound=nn.Module)


def build_dit(build: Callable[[], M], state_dict: Mapping[str, torch.Tensor], path: object, *, name: str,
              holder: str | None = None, dtype: torch.dtype, device: str | torch.device, log: logging.Logger) -> M:
    """``build()`` on the meta device with the checkpoint's tensors assigned (cast to ``dtype``, on
    ``device``), so the weights are never allocated twice; strict, in eval mode.

    ``state_dict`` has the model's own keys (prefix already removed). Every key of the model must be
    there with its shape (else :class:`CheckpointError` naming ``path``: "the ``holder`` lacks ...",
    ``holder`` defaulting to ``name``); keys the model does not have are ignored, with a warning on
    ``log`` (the family loader's logger, so the warning says which loader it comes from).
    """
    with torch.device("meta"):
        model = build()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CheckpointError(f"{path}: the {holder or name} lacks {len(missing)} tensors, e.g. {missing[:3]}; "
                              "the file is incomplete or of another model")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        log.warning("%s: %d tensors are not part of the %s and are ignored, e.g. %s", path, len(unexpected), name,
                    unexpected[:3])
    for key, value in expected.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {key} has shape {list(state_dict[key].shape)}, expected "
                                  f"{list(value.shape)} for the configuration read from the file")
    weights = {k: state_dict[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()
