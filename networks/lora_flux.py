"""LoRA networks for FLUX.1 (dev/schnell) and Chroma, with the kohya-ss network-module plug-in API.

``--network_module networks.lora_flux`` resolves to this module; the trainer calls
:func:`create_network` / :func:`create_network_from_weights` exactly as for ``networks.lora``, and
the network object is the same family-agnostic :class:`~networks.lora_network.LoRANetwork`.

Which layers, and their names in the file (the file format ComfyUI, Forge and diffusers read; see
``reference/lora_keys.json`` ``flux_dev_lora_dim8_*``):

* DiT (``lora_unet_``): every ``nn.Linear`` inside ``DoubleStreamBlock`` and ``SingleStreamBlock``
  named by its BFL module path with dots as underscores: ``lora_unet_double_blocks_0_img_attn_qkv``,
  ``..._img_attn_proj``, ``..._img_mlp_0``, ``..._img_mlp_2``, ``..._img_mod_lin`` (and ``txt_``),
  ``lora_unet_single_blocks_0_linear1``, ``..._linear2``, ``..._modulation_lin``. With ``in_dims``
  also the input embedders (``lora_unet_img_in``, ``lora_unet_time_in_in_layer``, ...).
  Chroma's blocks are the same classes without the modulation layers (``*_mod_lin``,
  ``modulation_lin``), so its LoRAs have the other names only; its approximator
  (``distilled_guidance_layer``) is not a target, as in the reference; of ``in_dims`` only
  ``img_in`` and ``txt_in`` exist. Its text encoders are ``[None, T5]`` (no CLIP-L).
* CLIP-L (``lora_te1_``): ``q/k/v/out_proj`` and ``fc1/fc2`` as in ``networks.lora``
  (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``).
* T5-XXL (``lora_te3_``, only with ``train_t5xxl=True``): ``q/k/v/o`` of ``T5Attention`` and
  ``wi_0/wi_1/wo`` of ``T5DenseGatedActDense`` (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``).
  The number 3 is the file format's (FLUX has two text encoders, the format counts as SD3 does).

``--network_args`` (strings):

* ``train_blocks``: ``all`` (default), ``single`` or ``double``;
  ``train_double_block_indices`` / ``train_single_block_indices``: ``all``, ``none`` or a list
  such as ``0,2,5-10``.
* per-layer-type ranks ``img_attn_dim``, ``txt_attn_dim``, ``img_mlp_dim``, ``txt_mlp_dim``,
  ``img_mod_dim``, ``txt_mod_dim``, ``single_dim``, ``single_mod_dim`` (default ``network_dim``;
  0 skips that type). Alphas stay ``network_alpha``.
* ``in_dims``: ``[img, time, vector, guidance, txt]`` ranks of the input embedders (0 = none;
  default none).
* ``split_qkv``: ``True`` trains separate low-rank updates for q, k, v (and the MLP input of the
  single blocks' fused ``linear1``). The file format does not change: each fused layer is saved
  as ONE LoRA whose ``lora_up`` is block-diagonal (rank = parts x rank, alpha = parts x alpha so
  the scale alpha/rank is each part's).
* ``train_t5xxl``: ``True`` adds the T5 modules (text-encoder output caching cannot be used then).
* ``conv_dim``/``conv_alpha`` are accepted for compatibility (FLUX has no conv layers in its
  blocks), ``dropout``, ``rank_dropout``, ``module_dropout``, the LoRA+ ratios and ``verbose`` as
  in ``networks.lora``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from networks.lora import ModelScope, _arg_value
from networks.lora_dit import (
    SplitLoRAModule, SplitPlan, TextEncoderSpec, TypeDimArgs, assemble_network, common_args, linears, network_dim_alpha,
    network_from_weights, parse_block_indices, parse_rank_list, parse_type_dims, plan_dit_module, text_encoder_scopes,
)
from networks.lora_network import LoRANetwork

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "flux_scopes", "FluxNetworkArgs",
           "parse_flux_network_args", "parse_block_indices", "SplitLoRAModule"]

LORA_PREFIX_FLUX = "lora_unet"
LORA_PREFIX_CLIP_L = "lora_te1"
LORA_PREFIX_T5 = "lora_te3"

DIT_TARGET_CLASSES = ("DoubleStreamBlock", "SingleStreamBlock")

#: the layer types the per-type ranks address, by their path inside a block
_DOUBLE_TYPES = {"img_attn.qkv": "img_attn_dim", "img_attn.proj": "img_attn_dim", "img_mlp.0": "img_mlp_dim",
                 "img_mlp.2": "img_mlp_dim", "img_mod.lin": "img_mod_dim",
                 "txt_attn.qkv": "txt_attn_dim", "txt_attn.proj": "txt_attn_dim", "txt_mlp.0": "txt_mlp_dim",
                 "txt_mlp.2": "txt_mlp_dim", "txt_mod.lin": "txt_mod_dim"}
_SINGLE_TYPES = {"linear1": "single_dim", "linear2": "single_dim", "modulation.lin": "single_mod_dim"}
TYPE_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                 "single_dim", "single_mod_dim")
#: ``in_dims`` order and the embedder module paths each entry adapts
IN_DIM_MODULES = (("img_in",), ("time_in.in_layer", "time_in.out_layer"),
                  ("vector_in.in_layer", "vector_in.out_layer"), ("guidance_in.in_layer", "guidance_in.out_layer"),
                  ("txt_in",))

_FLUX_KEYS = frozenset({"train_blocks", "train_double_block_indices", "train_single_block_indices", "in_dims",
                        "split_qkv", "train_t5xxl", *TYPE_DIM_KEYS})


# --- network_args ----------------------------------------------------------------------------

IN_DIM_NAMES = ("img", "time", "vector", "guidance", "txt")


@dataclass(frozen=True)
class FluxNetworkArgs(TypeDimArgs):
    """The FLUX-specific ``--network_args``; the common ones are :class:`networks.lora.NetworkArgs`."""

    train_blocks: str = "all"
    train_double_block_indices: str | None = None
    train_single_block_indices: str | None = None
    type_dims: tuple[tuple[str, int], ...] = ()
    in_dims: tuple[int, ...] | None = None
    split_qkv: bool = False
    train_t5xxl: bool = False


def parse_flux_network_args(kwargs: Mapping[str, object]) -> FluxNetworkArgs:
    train_blocks = str(kwargs.get("train_blocks", "all") or "all").strip().lower()
    if train_blocks not in ("all", "single", "double"):
        raise ValueError(f"--network_args train_blocks={train_blocks!r}: use all, single or double")
    return FluxNetworkArgs(
        train_blocks=train_blocks,
        train_double_block_indices=kwargs.get("train_double_block_indices"),
        train_single_block_indices=kwargs.get("train_single_block_indices"),
        type_dims=parse_type_dims(kwargs, TYPE_DIM_KEYS),
        in_dims=parse_rank_list(kwargs.get("in_dims"), "in_dims", IN_DIM_NAMES),
        split_qkv=bool(_arg_value(kwargs, "split_qkv", bool)),
        train_t5xxl=bool(_arg_value(kwargs, "train_t5xxl", bool)),
    )


def _common_args(kwargs: Mapping[str, object]):
    return common_args(kwargs, _FLUX_KEYS)


# --- scopes ----------------------------------------------------------------------------------

TEXT_ENCODERS = (TextEncoderSpec(LORA_PREFIX_CLIP_L, "clip"), TextEncoderSpec(LORA_PREFIX_T5, "t5"))


def flux_scopes(text_encoders, flux: nn.Module | None, *, include_t5: bool = True) -> list[ModelScope]:
    """Scopes of ``[CLIP-L, T5-XXL]`` (either may be None) and the DiT, with the file-format prefixes."""
    scopes = text_encoder_scopes(text_encoders, TEXT_ENCODERS, include=(True, include_t5))
    if flux is not None:
        scopes.append(ModelScope(LORA_PREFIX_FLUX, flux, DIT_TARGET_CLASSES))
    return scopes


def _split_sizes(path: str, layer: nn.Linear, flux: nn.Module) -> tuple[int, ...] | None:
    """Output sizes of the parts fused in ``layer`` (q, k, v [, mlp]), None for unfused layers."""
    hidden = layer.in_features
    if path.endswith("attn.qkv"):
        return (layer.out_features // 3,) * 3
    if path.endswith("linear1"):
        mlp = layer.out_features - 3 * hidden
        return (hidden, hidden, hidden, mlp)
    return None


def plan_dit_modules(flux: nn.Module, dim: int, alpha: float, args: FluxNetworkArgs) -> list[SplitPlan]:
    """The DiT modules ``create_network`` makes, each with its split sizes (``split_qkv``) or None."""
    double_blocks = getattr(flux, "double_blocks", None)
    single_blocks = getattr(flux, "single_blocks", None)
    if double_blocks is None or single_blocks is None:
        raise ValueError(f"networks.lora_flux: {type(flux).__name__} is not a FLUX DiT (no double_blocks/"
                         "single_blocks); use the network module of your model family")
    planned: list[SplitPlan] = []

    def add(path: str, layer: nn.Linear, rank: int) -> None:
        if rank:
            sizes = _split_sizes(path, layer, flux) if args.split_qkv else None
            planned.append(plan_dit_module(LORA_PREFIX_FLUX, path, layer, rank, alpha, sizes))

    groups = []
    if args.train_blocks in ("all", "double"):
        indices = parse_block_indices(args.train_double_block_indices, len(double_blocks), "train_double_block_indices")
        groups.append(("double_blocks", double_blocks, indices, _DOUBLE_TYPES))
    if args.train_blocks in ("all", "single"):
        indices = parse_block_indices(args.train_single_block_indices, len(single_blocks), "train_single_block_indices")
        groups.append(("single_blocks", single_blocks, indices, _SINGLE_TYPES))
    for kind, blocks, indices, types in groups:
        for index in indices:
            for sub, layer in linears(blocks[index]):
                key = types.get(sub)
                if key is None:
                    raise ValueError(f"networks.lora_flux: {kind}.{index}.{sub} is not a layer of the BFL FLUX "
                                     "layout; the DiT does not have the structure the LoRA format names")
                add(f"{kind}.{index}.{sub}", layer, args.type_dim(key, dim))
    if args.in_dims:
        modules = dict(flux.named_modules())
        for rank, paths in zip(args.in_dims, IN_DIM_MODULES):
            for path in paths:
                if rank and path not in modules:
                    logger.warning("in_dims: this model has no %s (schnell has no guidance_in, Chroma only img_in "
                                   "and txt_in); skipped", path)
                    continue
                if rank:
                    add(path, modules[path], rank)
    return planned


# --- the plug-in API -------------------------------------------------------------------------

def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    flux: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """A fresh LoRA network for a FLUX DiT and ``[CLIP-L, T5-XXL]`` (see the module docstring).

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0. ``vae`` is unused (plug-in
    API). The network is not applied yet: call ``apply_to`` next. Its ``train_t5xxl`` attribute
    tells the trainer whether T5 is trained.
    """
    common = _common_args(kwargs)
    flux_args = parse_flux_network_args(kwargs)
    dim, alpha = network_dim_alpha(network_dim, network_alpha)
    scopes = flux_scopes(text_encoders, None, include_t5=flux_args.train_t5xxl)
    dit_plan = plan_dit_modules(flux, dim, alpha, flux_args) if flux is not None else []
    # --text_encoder_lr takes CLIP-L's and T5's lr, whether or not T5 has modules
    return assemble_network(scopes, dit_plan, dim=dim, alpha=alpha, multiplier=multiplier,
                            neuron_dropout=neuron_dropout, common=common, num_text_encoders=2,
                            train_t5xxl=flux_args.train_t5xxl)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    flux: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a FLUX LoRA file, with its weights loaded: ``(network, weights_sd)``.

    Ranks and alphas come from the file (missing alpha = rank); any Linear of the DiT, CLIP-L or
    T5 may be adapted, so files of other trainers in kohya's format load. ``lora_te3_`` keys load
    into T5. ``for_inference`` puts the network in eval mode without gradients.
    """
    return network_from_weights(flux_scopes(text_encoders, flux), file, weights_sd, multiplier=multiplier,
                                common=_common_args(kwargs), num_text_encoders=2, t5_prefix=LORA_PREFIX_T5,
                                for_inference=for_inference)
