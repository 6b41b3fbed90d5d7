"""Deterministic random weights and files for the tiny DiTs (``tiny_flux``, ``tiny_sd3``).

One recipe for both, so the tiny FLUX and SD3 models are initialised alike: weight matrices (and
convolution kernels) N(0, 1/fan_in) so activations stay O(1) through the blocks, biases small
(0.02 N(0, 1)), norm weights near 1 (1 + 0.1 N(0, 1)). Nothing is zero (unlike a fresh reference
init of the modulations and the final layer), so outputs depend on every input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from library.io_utils import save_safetensors


def random_dit_state_dict(build: Callable[[], nn.Module], seed: int, *, norm_suffixes: tuple[str, ...],
                          fixed: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Float32 weights for every key of ``build()`` (built on the meta device, shapes only), the
    same for the same (model, seed).

    Keys are filled in sorted order from one generator seeded with ``seed``, so the values do not
    depend on module definition order. Keys ending in ``norm_suffixes`` are norm weights; keys in
    ``fixed`` take the given tensor and draw no random numbers.
    """
    fixed = fixed or {}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build().state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key in sorted(shapes):
        if key in fixed:
            state_dict[key] = fixed[key]
            continue
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator)
        if key.endswith(norm_suffixes):
            value = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            value = 0.02 * noise
        else:
            value = noise / shape[1:].numel() ** 0.5  # fan_in: input channels x kernel size
        state_dict[key] = value
    return state_dict


def write_dit_file(path: str | os.PathLike, make_state_dict: Callable[[], Mapping[str, torch.Tensor]], *, prefix: str,
                   dtype: torch.dtype, allowed_prefixes: tuple[str, ...], caller: str) -> Path:
    """Write ``make_state_dict()`` cast to ``dtype`` as a safetensors file, every key under ``prefix``;
    parent folders are made. ``prefix`` must be one of ``allowed_prefixes`` (else ``ValueError``
    naming ``caller``, raised before any weights are made)."""
    if prefix not in allowed_prefixes:
        raise ValueError(f"{caller}: prefix must be " + " or ".join(repr(p) for p in allowed_prefixes)
                         + f", got {prefix!r}")
    state_dict = make_state_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({prefix + k: v.to(dtype) for k, v in state_dict.items()}, path)
    return path
