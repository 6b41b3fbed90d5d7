"""LoRA-FA for Stable Diffusion 1.x/2.x and SDXL: LoRA with a frozen ``down`` (A) matrix.

``--network_module networks.lora_fa``. LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient
Low-rank Adaptation") keeps the randomly initialised projection ``down`` fixed and trains only
``up``, so the update ``ΔW = up @ down · alpha/rank`` lives in the row space ``down`` picked at the
start. The optimizer holds half the LoRA state and no gradient is computed or stored for
``down``.

Everything else is ``networks.lora``: the same layers, names, ``--network_args`` (``conv_dim``,
dropouts, block options, LoRA+ ...) and the same file (``lora_down.weight`` / ``lora_up.weight`` /
``alpha``), so a LoRA-FA file is an ordinary LoRA file for every tool and UI. ``down`` is a
buffer of its module (saved and loaded like the weight it replaces, moved and cast with the
network, never handed to the optimizer). ``--scale_weight_norms`` scales only ``up``.
User documentation: ``docs/networks.md``.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

from networks.lora_modules import LoRAModule
from networks.lora_network import LoRANetwork
from networks.lora_variants import create_variant_network, create_variant_network_from_weights

__all__ = ["create_network", "create_network_from_weights", "LoRAFAModule", "LoRAFANetwork"]


class LoRAFAModule(LoRAModule):
    """A :class:`LoRAModule` whose ``lora_down.weight`` is a buffer: fixed at its initial value."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        frozen = self.lora_down.weight.detach()
        del self.lora_down.weight  # the Parameter goes; a buffer of the same name takes its place
        self.lora_down.register_buffer("weight", frozen)

    @torch.no_grad()
    def scale_delta_(self, factor: torch.Tensor) -> None:
        """Multiply the update by ``factor``: only ``up`` is trained, so it takes the whole factor."""
        up = self.lora_up.weight
        up.mul_(factor.to(up.device, up.dtype))


class LoRAFANetwork(LoRANetwork):
    """A :class:`LoRANetwork` of :class:`LoRAFAModule` s; ``parameters()`` are the ``up`` weights only."""

    module_kind = "LoRA-FA"


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> LoRAFANetwork:
    """A fresh LoRA-FA network: the modules ``networks.lora.create_network`` makes, ``down`` frozen.

    Same arguments and ``--network_args`` as ``networks.lora``; ``vae`` is unused.
    """
    return create_variant_network(LoRAFANetwork, LoRAFAModule, multiplier, network_dim, network_alpha,
                                  text_encoder, unet, neuron_dropout, kwargs)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRAFANetwork, dict[str, torch.Tensor]]:
    """A LoRA-FA network shaped like a LoRA file (any LoRA file: the format is the same), weights loaded.

    Returns ``(network, weights_sd)`` as ``networks.lora.create_network_from_weights`` does; the
    file's ``lora_down`` becomes the frozen projection (``--network_weights`` / ``--dim_from_weights``
    continue a LoRA-FA run, or turn a LoRA into LoRA-FA training with its ``down`` fixed).
    """
    return create_variant_network_from_weights(LoRAFANetwork, LoRAFAModule, multiplier, file, text_encoder, unet,
                                               weights_sd, for_inference, kwargs)
