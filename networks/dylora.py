"""DyLoRA for Stable Diffusion 1.x/2.x and SDXL: one LoRA that is good at every rank ``unit, 2·unit, …``.

``--network_module networks.dylora --network_dim 16 --network_args "unit=4"``. DyLoRA (Valipour et
al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free
Low-Rank Adaptation") trains the ranks of a LoRA in nested slices of ``unit`` ranks. In each
training forward, a module draws a slice index ``b`` uniformly from ``0 … rank/unit − 1`` and
computes the LoRA truncated to its first ``t = (b + 1)·unit`` ranks::

    y = W x + up[:, :t] @ down[:t] x · multiplier · alpha/rank · sqrt(rank / t)

where only slice ``b`` (ranks ``b·unit … t−1``) gets gradients; the earlier slices take part
detached, the later ones not at all. The parameters of each slice are separate tensors, so an
optimizer leaves the slices a step did not train untouched (no momentum or weight decay on them).
The ``sqrt(rank/t)`` factor (kohya's) strengthens the truncated LoRA, which has fewer ranks to work
with. Each module draws for itself, from the CPU random generator, so checkpointed blocks
recompute the same choice and a seeded run is reproducible. In eval mode (previews, validation, generation) the full rank is used with
the plain LoRA scale ``alpha/rank``.

Layers, names, ``--network_args`` and the file are ``networks.lora``'s (``conv_dim``/``conv_alpha``,
dropouts, block options, LoRA+, ...), plus ``unit`` (default 1): every module's rank
(``network_dim``, ``conv_dim``, block dims) must be a multiple of it. The file holds the full-rank
LoRA (``lora_down.weight`` / ``lora_up.weight`` / ``alpha``), so it loads as a LoRA anywhere;
``networks/extract_lora_from_dylora.py`` writes the rank-``t`` sub-LoRAs as their own files. SDXL
files use ``lora_te1_``/``lora_te2_`` like ``networks.lora`` (kohya's DyLoRA names only ``lora_te``).
User documentation: ``docs/networks.md``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.lora_modules import LoRAModule, lora_delta_weight
from networks.lora_network import LoRANetwork
from networks.lora_variants import create_variant_network, create_variant_network_from_weights

__all__ = ["create_network", "create_network_from_weights", "DyLoRAModule", "DyLoRANetwork", "UnitSlices",
           "parse_unit", "truncated_alpha"]

DEFAULT_UNIT = 1


def truncated_alpha(alpha: float, rank: int, truncated_rank: int) -> float:
    """The alpha that makes a plain rank-``truncated_rank`` LoRA compute what DyLoRA trains at that rank.

    Training at rank ``t`` scales by ``alpha/rank · sqrt(rank/t)``; a LoRA of rank ``t`` scales by
    ``alpha_t / t``, so ``alpha_t = alpha · sqrt(t / rank)``.
    """
    return float(alpha) * math.sqrt(truncated_rank / rank)


class UnitSlices(nn.Module):
    """One LoRA factor held as ``rank / unit`` parameters of ``unit`` ranks each.

    ``rank_dim`` is the rank axis (0 for ``down`` [r, in, ...], 1 for ``up`` [out, r, ...]).
    :attr:`weight` is the whole factor, and the state dict holds only ``weight``: the file format
    is the plain LoRA's. ``forward`` applies the whole factor as the layer it replaces did (linear,
    or conv with that layer's stride/padding/dilation).
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank_dim: int, unit: int) -> None:
        super().__init__()
        self.rank_dim = rank_dim
        self.unit = unit
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        chunks = layer.weight.detach().split(unit, dim=rank_dim)
        self.count = len(chunks)
        for index, chunk in enumerate(chunks):
            self.register_parameter(f"unit{index}", nn.Parameter(chunk.clone()))

    def slices(self) -> list[nn.Parameter]:
        return [getattr(self, f"unit{index}") for index in range(self.count)]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(self.slices(), dim=self.rank_dim)

    def truncated(self, index: int) -> torch.Tensor:
        """Slices ``0 … index``; only slice ``index`` carries gradients."""
        parts = self.slices()
        return torch.cat([p.detach() for p in parts[:index]] + [parts[index]], dim=self.rank_dim)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)
        return F.linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.weight)

    # the file format: one ``weight`` tensor
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        expected = self.weight.shape
        if value.shape != expected:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                              f"the shape in the current model is {tuple(expected)}.")
            return
        with torch.no_grad():
            for param, chunk in zip(self.slices(), value.split(self.unit, dim=self.rank_dim)):
                param.copy_(chunk)


class DyLoRAModule(LoRAModule):
    """A :class:`LoRAModule` trained one ``unit``-rank slice at a time (see the module docstring).

    ``trained_unit`` fixes the slice index of every training forward (``None``: drawn each time).
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, *, unit: int = DEFAULT_UNIT) -> None:
        if int(unit) <= 0 or int(lora_dim) % int(unit):
            raise ValueError(f"DyLoRA module {lora_name}: rank {lora_dim} is not a multiple of unit {unit}; "
                             "set network_dim and conv_dim (and block dims) to multiples of unit")
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout)
        self.unit = int(unit)
        self.lora_down = UnitSlices(self.lora_down, 0, self.unit)
        self.lora_up = UnitSlices(self.lora_up, 1, self.unit)
        self.trained_unit: int | None = None

    @property
    def num_units(self) -> int:
        return self.lora_dim // self.unit

    def _train_delta(self, x: torch.Tensor) -> torch.Tensor:
        index = self.trained_unit
        if index is None:
            # CPU generator: no device sync, and checkpoint recomputation replays the same draw
            index = int(torch.randint(self.num_units, (), device="cpu"))
        rank = (index + 1) * self.unit
        lx = self.lora_down.apply(x, self.lora_down.truncated(index))
        if self.dropout:
            lx = F.dropout(lx, p=self.dropout, training=True)
        scale = self.scale * math.sqrt(self.lora_dim / rank)
        if self.rank_dropout:
            if self.is_conv:
                mask_shape = (lx.shape[0], rank) + (1,) * (lx.dim() - 2)
            else:
                mask_shape = (lx.shape[0],) + (1,) * (lx.dim() - 2) + (rank,)
            keep = torch.rand(mask_shape, device=lx.device) >= self.rank_dropout
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up.apply(lx, self.lora_up.truncated(index)) * (self.multiplier * scale)

    def truncated_delta_weight(self, rank: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update the rank-``rank`` truncation applies (without the multiplier), in the layer's layout."""
        if rank % self.unit or not 0 < rank <= self.lora_dim:
            raise ValueError(f"{self.lora_name}: rank {rank} is not a multiple of unit {self.unit} up to {self.lora_dim}")
        down = self.lora_down.weight.narrow(0, 0, rank).to(dtype=dtype)
        up = self.lora_up.weight.narrow(1, 0, rank).to(dtype=dtype)
        return lora_delta_weight(up, down, self.scale * math.sqrt(self.lora_dim / rank))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", unit={self.unit}"


class DyLoRANetwork(LoRANetwork):
    """A :class:`LoRANetwork` of :class:`DyLoRAModule` s; ``unit`` is their slice size."""

    module_kind = "DyLoRA"
    unit: int = DEFAULT_UNIT

    def set_trained_unit(self, index: int | None) -> None:
        """Train slice ``index`` (rank ``(index + 1)·unit``) in every module from now on; a module with
        fewer slices trains its last one. ``None``: each module draws its slice per forward again."""
        if index is not None and index < 0:
            raise ValueError(f"slice index {index} must be >= 0")
        for module in self.loras:
            module.trained_unit = None if index is None else min(index, module.num_units - 1)


def parse_unit(kwargs: Mapping[str, object]) -> tuple[int, dict[str, object]]:
    """``(unit, the other network args)``; ``unit`` must be a positive integer."""
    rest = dict(kwargs)
    raw = rest.pop("unit", None)
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return DEFAULT_UNIT, rest
    try:
        number = float(raw.strip() if isinstance(raw, str) else raw)
        if not number.is_integer() or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"--network_args unit={raw!r}: expected a positive integer (e.g. unit=4)") from None
    return int(number), rest


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> DyLoRANetwork:
    """A fresh DyLoRA network: ``networks.lora``'s modules and args, plus ``unit`` (default 1)."""
    unit, rest = parse_unit(kwargs)
    module_class = functools.partial(DyLoRAModule, unit=unit)
    network = create_variant_network(DyLoRANetwork, module_class, multiplier, network_dim, network_alpha,
                                     text_encoder, unet, neuron_dropout, rest)
    network.unit = unit
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """A DyLoRA network shaped like a (Dy)LoRA file, weights loaded; ``unit`` from ``kwargs`` (default 1)."""
    unit, rest = parse_unit(kwargs)
    module_class = functools.partial(DyLoRAModule, unit=unit)
    network, weights_sd = create_variant_network_from_weights(DyLoRANetwork, module_class, multiplier, file,
                                                              text_encoder, unet, weights_sd, for_inference, rest)
    network.unit = unit
    return network, weights_sd
