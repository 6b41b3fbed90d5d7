"""LoRA networks for SD3 / SD3.5 (Medium, Large, 3.5 Medium), with the kohya-ss network-module plug-in API.

``--network_module networks.lora_sd3`` resolves to this module; the trainer calls
:func:`create_network` / :func:`create_network_from_weights` exactly as for ``networks.lora``, and
the network object is the same family-agnostic :class:`~networks.lora_network.LoRANetwork`.

Which layers, and their names in the file (see ``reference/lora_keys.json`` ``sd3_*`` / ``sd35_*``):

* MMDiT (``lora_unet_``): every ``nn.Linear`` inside the ``JointBlock`` s, named by the SAI module
  path with dots as underscores: ``lora_unet_joint_blocks_0_context_block_attn_qkv``,
  ``..._context_block_attn_proj``, ``..._context_block_mlp_fc1``/``fc2``,
  ``..._context_block_adaLN_modulation_1``, the same for ``x_block``, and SD3.5 Medium's
  ``..._x_block_attn2_qkv``/``proj``. With ``emb_dims`` also the embedders and the final layer.
* CLIP-L (``lora_te1_``), CLIP-G (``lora_te2_``): ``q/k/v/out_proj`` and ``fc1/fc2`` as in
  ``networks.lora`` (``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``).
* T5-XXL (``lora_te3_``, only with ``train_t5xxl=True``).

``--network_args`` (strings):

* ``train_block_indices``: ``all`` (default), ``none`` or a list such as ``0,2,5-10``.
* per-layer-type ranks ``context_attn_dim``, ``context_mlp_dim``, ``context_mod_dim``,
  ``x_attn_dim`` (also MMDiT-X's ``attn2``), ``x_mlp_dim``, ``x_mod_dim`` (default ``network_dim``;
  0 skips that type). Alphas stay ``network_alpha``.
* ``emb_dims``: ``[context, t, x, y, final_mod, final_linear]`` ranks for ``context_embedder``,
  ``t_embedder.mlp``, ``x_embedder.proj`` (a 2x2 conv), ``y_embedder.mlp``,
  ``final_layer.adaLN_modulation.1`` and ``final_layer.linear`` (0 = none; default none).
* ``split_qkv``: ``True`` trains q, k and v of each fused ``qkv`` as separate low-rank updates,
  saved as one LoRA with a block-diagonal ``lora_up`` (the file format does not change).
* ``train_t5xxl``: ``True`` adds the T5 modules (text-encoder output caching cannot be used then).
* ``conv_dim``/``conv_alpha`` are accepted for compatibility and have no effect (the joint blocks
  have no conv layers; the patch conv ``x_embedder.proj`` is adapted through ``emb_dims``).
* ``dropout``, ``rank_dropout``, ``module_dropout``, the LoRA+ ratios and ``verbose`` as in
  ``networks.lora``.
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
    SplitPlan, TextEncoderSpec, TypeDimArgs, assemble_network, common_args, linears, network_dim_alpha,
    network_from_weights, parse_block_indices, parse_rank_list, parse_type_dims, plan_dit_module, text_encoder_scopes,
)
from networks.lora_network import LoRANetwork

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "sd3_scopes", "SD3NetworkArgs", "parse_sd3_network_args"]

LORA_PREFIX_MMDIT = "lora_unet"
TEXT_ENCODERS = (TextEncoderSpec("lora_te1", "clip"), TextEncoderSpec("lora_te2", "clip"),
                 TextEncoderSpec("lora_te3", "t5"))
MMDIT_TARGET_CLASSES = ("JointBlock",)

TYPE_DIM_KEYS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
#: ``emb_dims`` order and the module paths each entry adapts
EMB_NAMES = ("context", "t", "x", "y", "final_mod", "final_linear")
EMB_MODULES = (("context_embedder",), ("t_embedder.mlp.0", "t_embedder.mlp.2"), ("x_embedder.proj",),
               ("y_embedder.mlp.0", "y_embedder.mlp.2"), ("final_layer.adaLN_modulation.1",), ("final_layer.linear",))

_SD3_KEYS = frozenset({"train_block_indices", "emb_dims", "split_qkv", "train_t5xxl", *TYPE_DIM_KEYS})


@dataclass(frozen=True)
class SD3NetworkArgs(TypeDimArgs):
    """The SD3-specific ``--network_args``; the common ones are :class:`networks.lora.NetworkArgs`."""

    train_block_indices: str | None = None
    type_dims: tuple[tuple[str, int], ...] = ()
    emb_dims: tuple[int, ...] | None = None
    split_qkv: bool = False
    train_t5xxl: bool = False


def parse_sd3_network_args(kwargs: Mapping[str, object]) -> SD3NetworkArgs:
    """The SD3 keys of ``--network_args`` (strings or typed values); raises ``ValueError`` naming a bad key.

    ``train_block_indices`` is kept as text: it is checked against the model's depth when planning.
    """
    return SD3NetworkArgs(
        train_block_indices=kwargs.get("train_block_indices"),
        type_dims=parse_type_dims(kwargs, TYPE_DIM_KEYS),
        emb_dims=parse_rank_list(kwargs.get("emb_dims"), "emb_dims", EMB_NAMES),
        split_qkv=bool(_arg_value(kwargs, "split_qkv", bool)),
        train_t5xxl=bool(_arg_value(kwargs, "train_t5xxl", bool)),
    )


def _common_args(kwargs: Mapping[str, object]):
    return common_args(kwargs, _SD3_KEYS)


def sd3_scopes(text_encoders, mmdit: nn.Module | None, *, include_t5: bool = True) -> list[ModelScope]:
    """Scopes of ``[CLIP-L, CLIP-G, T5-XXL]`` (any may be None) and the MMDiT, with the file prefixes."""
    scopes = text_encoder_scopes(text_encoders, TEXT_ENCODERS, include=(True, True, include_t5))
    if mmdit is not None:
        scopes.append(ModelScope(LORA_PREFIX_MMDIT, mmdit, MMDIT_TARGET_CLASSES))
    return scopes


def _layer_type(sub: str) -> str | None:
    """The per-type rank key of a Linear at ``sub`` inside a JointBlock (``x_block.attn2.qkv`` -> x_attn_dim)."""
    stream, _, rest = sub.partition(".")
    if stream not in ("context_block", "x_block"):
        return None
    prefix = "context" if stream == "context_block" else "x"
    if rest.startswith(("attn.", "attn2.")):
        return f"{prefix}_attn_dim"
    if rest.startswith("mlp."):
        return f"{prefix}_mlp_dim"
    if rest.startswith("adaLN_modulation."):
        return f"{prefix}_mod_dim"
    return None


def plan_mmdit_modules(mmdit: nn.Module, dim: int, alpha: float, args: SD3NetworkArgs) -> list[SplitPlan]:
    """The MMDiT modules ``create_network`` makes, each with its split sizes (``split_qkv``) or None."""
    blocks = getattr(mmdit, "joint_blocks", None)
    if blocks is None:
        raise ValueError(f"networks.lora_sd3: {type(mmdit).__name__} is not an SD3 MMDiT (no joint_blocks); use the "
                         "network module of your model family")
    planned: list[SplitPlan] = []

    def add(path: str, layer: nn.Module, rank: int) -> None:
        if rank:
            sizes = None
            if args.split_qkv and path.endswith("qkv") and isinstance(layer, nn.Linear):
                sizes = (layer.out_features // 3,) * 3
            planned.append(plan_dit_module(LORA_PREFIX_MMDIT, path, layer, rank, alpha, sizes))

    for index in parse_block_indices(args.train_block_indices, len(blocks), "train_block_indices"):
        for sub, layer in linears(blocks[index]):
            key = _layer_type(sub)
            if key is None:
                raise ValueError(f"networks.lora_sd3: joint_blocks.{index}.{sub} is not a layer of the SAI MMDiT "
                                 "layout; the model does not have the structure the LoRA format names")
            add(f"joint_blocks.{index}.{sub}", layer, args.type_dim(key, dim))
    if args.emb_dims:
        modules = dict(mmdit.named_modules())
        for rank, paths in zip(args.emb_dims, EMB_MODULES):
            for path in paths:
                if rank and path in modules:
                    add(path, modules[path], rank)
                elif rank:
                    raise ValueError(f"emb_dims: this MMDiT has no {path}")
    return planned


# --- the plug-in API -------------------------------------------------------------------------

def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    mmdit: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """A fresh LoRA network for an SD3 MMDiT and ``[CLIP-L, CLIP-G, T5-XXL]`` (see the module docstring).

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0. ``vae`` is unused (plug-in
    API). The network is not applied yet: call ``apply_to`` next.
    """
    common = _common_args(kwargs)
    sd3_args = parse_sd3_network_args(kwargs)
    dim, alpha = network_dim_alpha(network_dim, network_alpha)
    scopes = sd3_scopes(text_encoders, None, include_t5=sd3_args.train_t5xxl)
    mmdit_plan = plan_mmdit_modules(mmdit, dim, alpha, sd3_args) if mmdit is not None else []
    # --text_encoder_lr takes CLIP-L's, CLIP-G's and T5's lr, whether or not T5 has modules
    return assemble_network(scopes, mmdit_plan, dim=dim, alpha=alpha, multiplier=multiplier,
                            neuron_dropout=neuron_dropout, common=common, num_text_encoders=3,
                            train_t5xxl=sd3_args.train_t5xxl)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    mmdit: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like an SD3 LoRA file, with its weights loaded: ``(network, weights_sd)``.

    Ranks and alphas come from the file (missing alpha = rank); any Linear/Conv of the MMDiT or the
    text encoders may be adapted. ``for_inference`` puts the network in eval mode without gradients.
    """
    return network_from_weights(sd3_scopes(text_encoders, mmdit), file, weights_sd, multiplier=multiplier,
                                common=_common_args(kwargs), num_text_encoders=3, t5_prefix="lora_te3",
                                for_inference=for_inference)
