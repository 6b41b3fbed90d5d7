"""Where each model tensor lands in the single file: read off the families' own converters.

Merging a LoRA into a checkpoint without loading it needs, for each adapted layer of the loaded
models (a diffusers/transformers parameter such as ``down_blocks.1.attentions.0.proj_in.weight``
or ``text_model.encoder.layers.3.self_attn.q_proj.weight``), the single-file tensor that holds it
and which rows of that tensor it is (SD2/SDXL's OpenCLIP stores q, k and v stacked in one
``attn.in_proj_weight``; SD2 stores ``proj_in`` as a Linear while our U-Net has a 1x1 conv).

Rather than a second key map, :func:`trace_single_file_layout` runs the models' own
``ldm_state_dict()`` (the very code that saves a checkpoint) on *labelled* stand-ins: shape-only
models are given, for every parameter of shape ``[R, ...]``, an int64 tensor ``[R, 1, ..., 1]``
whose row ``r`` holds ``(parameter number << 20) + r``. The converters only rename, reshape,
slice and concatenate along the first dimension, so each row of their output tells which
parameter and row it came from. The stand-ins are one value per row, so tracing an SDXL model
takes a few MB. Outputs the stand-ins do not explain (tensors the models do not hold, such as
``logit_scale``, or a transposed ``text_projection``) are simply not traced; a LoRA that adapts
such a tensor is refused by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["Segment", "trace_single_file_layout"]

_ROW_BITS = 20
_ROW_MASK = (1 << _ROW_BITS) - 1


@dataclass(frozen=True)
class Segment:
    """Rows ``[src_start, src_start + length)`` of model parameter ``(part, name)`` are rows
    ``[dst_start, dst_start + length)`` of single-file tensor ``key`` (same values per row, possibly
    another row shape, e.g. ``[C, C, 1, 1]`` <-> ``[C, C]``)."""

    key: str
    dst_start: int
    src_start: int
    length: int


class _StateDictOnly:
    """Stands in for a module inside ``ldm_state_dict()``: only ``state_dict()`` is called."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state_dict)


def _labels(number: int, shape: torch.Size) -> torch.Tensor:
    code = number << _ROW_BITS
    if len(shape) == 0:
        return torch.tensor(code, dtype=torch.int64)
    if shape[0] > _ROW_MASK:
        raise ValueError(f"cannot trace a tensor with {shape[0]} rows")
    rows = torch.arange(shape[0], dtype=torch.int64) + code
    return rows.reshape(shape[0], *([1] * (len(shape) - 1)))


def trace_single_file_layout(models, stored_shapes: Mapping[str, tuple[int, ...]] | None = None
                             ) -> dict[tuple[str, str], list[Segment]]:
    """``{(part, parameter name): [Segment, ...]}`` for the parameters of ``models`` that the single
    file stores row by row.

    ``models``: an ``SDModels``/``SDXLModels`` (typically shape-only, on the ``meta`` device, built
    from the file's header); ``part`` is the dataclass field of the module (``unet``, ``vae``,
    ``text_encoder``, ``text_encoder1`` ...), names are those of its ``state_dict()``.
    ``stored_shapes`` (the file's ``{key: shape}``): segments whose rows do not hold as many values
    as the parameter's rows are dropped (they cannot be the same data).
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    owners: dict[int, tuple[str, str, tuple[int, ...]]] = {}
    number = 1  # 0 is never a label, so made-up constants (zeros, identities) cannot pass for one
    replacements = {}
    for f in dataclasses.fields(models):
        module = getattr(models, f.name)
        if not isinstance(module, torch.nn.Module):
            continue
        labelled = {}
        for name, tensor in module.state_dict().items():
            labelled[name] = _labels(number, tensor.shape)
            owners[number] = (f.name, name, tuple(tensor.shape))
            number += 1
        parts[f.name] = labelled
        replacements[f.name] = _StateDictOnly(labelled)
    traced = dataclasses.replace(models, **replacements).ldm_state_dict()

    segments: dict[tuple[str, str], list[Segment]] = {}
    for key, out in traced.items():
        if out.is_meta or out.dtype != torch.int64 or out.ndim == 0:
            continue  # a kept file tensor, or a scalar no parameter is stored in
        flat = out.reshape(out.shape[0], -1)
        if flat.shape[1] != 1:
            continue  # not laid out row by row (e.g. transposed): not traceable
        codes = flat[:, 0]
        numbers, rows = (codes >> _ROW_BITS).tolist(), (codes & _ROW_MASK).tolist()
        start = 0
        while start < len(numbers):
            end = start + 1
            while end < len(numbers) and numbers[end] == numbers[start] and rows[end] == rows[end - 1] + 1:
                end += 1
            owner = owners.get(numbers[start])
            if owner is not None and rows[start] + (end - start) <= (owner[2][0] if owner[2] else 1):
                part, name, shape = owner
                stored = None if stored_shapes is None else stored_shapes.get(key)
                if stored is None or math.prod(stored[1:]) == math.prod(shape[1:]):
                    segments.setdefault((part, name), []).append(Segment(key, start, rows[start], end - start))
            start = end
    return segments
