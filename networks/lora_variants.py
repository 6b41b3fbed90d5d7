"""Building SD 1.x/2.x and SDXL networks whose modules are LoRA variants (DyLoRA, LoRA-FA).

The variants change what one module does during training, never which layers are adapted, what
they are called or how a file looks: they take ``networks.lora``'s planning (scopes, block
options, ranks from a file) unchanged and only build the network with their own module (and
network) class. ``networks/dylora.py`` and ``networks/lora_fa.py`` are thin plug-in modules over
:func:`create_variant_network` and :func:`create_variant_network_from_weights`.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from networks import lora
from networks.lora_blocks import parse_block_options, parse_lr_weight_options
from networks.lora_modules import LoRAModule
from networks.lora_network import LoRANetwork, PlannedModule, rename_lora_keys, weights_of

logger = logging.getLogger(__name__)

__all__ = ["create_variant_network", "create_variant_network_from_weights"]


def _build(network_class: type[LoRANetwork], module_class: Callable[..., LoRAModule], planned: list[PlannedModule],
           multiplier: float, dropout: float | None, args: lora.NetworkArgs, block_lr_weights: list[float] | None,
           aliases: Mapping[str, str]) -> LoRANetwork:
    network = network_class(
        planned,
        multiplier=multiplier,
        dropout=dropout,
        rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout,
        loraplus_text_encoder_lr_ratio=args.loraplus_text_encoder_lr_ratio or args.loraplus_lr_ratio,
        loraplus_unet_lr_ratio=args.loraplus_unet_lr_ratio or args.loraplus_lr_ratio,
        block_lr_weights=block_lr_weights,
        name_aliases=aliases,
        module_class=module_class,
    )
    if args.verbose:
        for module in network.loras:
            logger.info("  %s: rank %d, alpha %g", module.lora_name, module.lora_dim, module.scale * module.lora_dim)
    return network


def create_variant_network(
    network_class: type[LoRANetwork],
    module_class: Callable[..., LoRAModule],
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None,
    network_args: Mapping[str, object],
) -> LoRANetwork:
    """``networks.lora.create_network`` with another module/network class: same layers, names,
    ranks and ``--network_args`` (``network_args`` must hold only the keys ``networks.lora`` knows)."""
    args = lora.parse_network_args(network_args)
    dim = lora.DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    alpha = lora.DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    if dim <= 0:
        raise ValueError(f"--network_dim must be a positive integer, got {network_dim}")
    conv_alpha = None
    if args.conv_dim:
        conv_alpha = lora.DEFAULT_CONV_ALPHA if args.conv_alpha is None else args.conv_alpha
    scopes = lora.sd_scopes(text_encoder, unet)
    blocks = parse_block_options(network_args, dim, alpha, args.conv_dim, conv_alpha, lora.block_layout_of(scopes))
    planned = lora.plan_modules(scopes, dim, alpha, args.conv_dim, conv_alpha, blocks)
    dropout = neuron_dropout if neuron_dropout is not None else args.dropout
    return _build(network_class, module_class, planned, multiplier, dropout, args,
                  blocks.lr_weights if blocks else None, lora.name_aliases(scopes))


def create_variant_network_from_weights(
    network_class: type[LoRANetwork],
    module_class: Callable[..., LoRAModule],
    multiplier: float,
    file: str | os.PathLike | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None,
    for_inference: bool,
    network_args: Mapping[str, object],
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """``networks.lora.create_network_from_weights`` with another module/network class: modules
    shaped like the LoRA file, its weights loaded, ``(network, weights_sd with file-format names)``."""
    source, weights_sd = weights_of(file, weights_sd)
    args = lora.parse_network_args(network_args)
    scopes = lora.sd_scopes(text_encoder, unet)
    aliases = lora.name_aliases(scopes)
    file_sd = weights_sd
    weights_sd = rename_lora_keys(file_sd, aliases, source)
    planned = lora.plan_from_weights(scopes, weights_sd, source, file_sd)
    ignored = sorted(k for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas") if k in network_args)
    if ignored:
        logger.warning("ranks come from %s: --network_args %s ignored", source, ", ".join(ignored))
    network = _build(network_class, module_class, planned, multiplier, args.dropout, args,
                     parse_lr_weight_options(network_args, lora.block_layout_of(scopes)), aliases)
    network.load_state_dict_checked(weights_sd, source)
    if for_inference:
        network.eval()
        network.requires_grad_(False)
    return network, weights_sd
