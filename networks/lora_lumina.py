"""LoRA networks for Lumina-Image 2.0, with the kohya-ss network-module plug-in API.

``--network_module networks.lora_lumina`` resolves to this module; the trainer calls
:func:`create_network` / :func:`create_network_from_weights` exactly as for ``networks.lora``, and
the network object is the same family-agnostic :class:`~networks.lora_network.LoRANetwork`.

Which layers, and their names in the file (the reference's ``networks/lora_lumina.py`` names):

* NextDiT (``lora_unet_``): every ``nn.Linear`` inside the ``JointTransformerBlock`` s and the
  ``FinalLayer``, named by the original module path with dots as underscores:
  ``lora_unet_layers_0_attention_qkv``, ``..._attention_out``, ``..._feed_forward_w1``/``w2``/``w3``,
  ``..._adaLN_modulation_1``, the same under ``lora_unet_noise_refiner_N_`` and
  ``lora_unet_context_refiner_N_`` (no modulation there), ``lora_unet_final_layer_linear``,
  ``lora_unet_final_layer_adaLN_modulation_1``. With ``embedder_dims`` also ``lora_unet_x_embedder``,
  ``lora_unet_t_embedder_mlp_0``/``_2`` and ``lora_unet_cap_embedder_1``.
* Gemma-2 (``lora_te_``, one text encoder): ``q/k/v/o_proj`` of ``Gemma2Attention`` and
  ``gate/up/down_proj`` of ``Gemma2MLP`` (``lora_te_layers_0_self_attn_q_proj``), unless
  ``--network_train_unet_only``. Deliberate difference: the last decoder layer gets no modules. The
  DiT reads Gemma's penultimate hidden states, which that layer does not reach, so the reference's
  modules there never receive a gradient (``check_lora_weights.py`` reports them as untrained);
  files that have them still load.

``--network_args`` (strings):

* ``train_blocks``: ``all`` (default: main layers, both refiners, final layer), ``transformer``
  (main layers and final layer), ``refiners``, ``noise_refiner``, ``context_refiner`` (alias
  ``cap_refiner``); ``train_block_indices``: main layers to adapt, ``all``, ``none`` or ``0,2,5-10``.
* per-layer-type ranks ``attn_dim`` (``attention.qkv``/``out``), ``mlp_dim`` (``feed_forward.*``),
  ``mod_dim`` (every ``adaLN_modulation.1``) and ``refiner_dim`` (every layer of the refiner blocks;
  it wins over the other three there); default ``network_dim``, 0 skips. Deliberate fix: the
  reference matches ``mlp_dim`` against the word "mlp", which no NextDiT layer name contains, so
  there it never applies; here it sets the feed-forward ranks.
* ``embedder_dims``: ``[x_embedder, t_embedder, cap_embedder]`` ranks (0 = none; default none).
* ``split_qkv``: ``True`` trains q, k and v of each fused ``attention.qkv`` (sizes ``heads x
  head_dim``, ``kv_heads x head_dim`` twice) as separate low-rank updates, saved as one standard
  LoRA with a block-diagonal ``lora_up`` (the file format does not change).
* ``conv_dim``/``conv_alpha`` are accepted for compatibility (the NextDiT has no conv layers),
  ``dropout``, ``rank_dropout``, ``module_dropout``, the LoRA+ ratios and ``verbose`` as in ``networks.lora``.
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
    SplitPlan, TypeDimArgs, as_list, assemble_network, common_args, linears, network_dim_alpha, network_from_weights,
    parse_block_indices, parse_rank_list, parse_type_dims, plan_dit_module, plan_text_encoder_modules,
)
from networks.lora_network import LoRANetwork

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "lumina_scopes", "LuminaNetworkArgs",
           "parse_lumina_network_args"]

LORA_PREFIX_DIT = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
DIT_TARGET_CLASSES = ("JointTransformerBlock", "FinalLayer")
TEXT_ENCODER_TARGET_CLASSES = ("Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP")

TYPE_DIM_KEYS = ("attn_dim", "mlp_dim", "mod_dim", "refiner_dim")
TRAIN_BLOCKS = {"all": ("layers", "noise_refiner", "context_refiner", "final_layer"),
                "transformer": ("layers", "final_layer"), "refiners": ("noise_refiner", "context_refiner"),
                "noise_refiner": ("noise_refiner",), "context_refiner": ("context_refiner",),
                "cap_refiner": ("context_refiner",)}
#: ``embedder_dims`` order and the module paths each entry adapts
EMBEDDER_NAMES = ("x_embedder", "t_embedder", "cap_embedder")
EMBEDDER_MODULES = (("x_embedder",), ("t_embedder.mlp.0", "t_embedder.mlp.2"), ("cap_embedder.1",))

_LUMINA_KEYS = frozenset({"train_blocks", "train_block_indices", "embedder_dims", "split_qkv", *TYPE_DIM_KEYS})


@dataclass(frozen=True)
class LuminaNetworkArgs(TypeDimArgs):
    """The Lumina-specific ``--network_args``; the common ones are :class:`networks.lora.NetworkArgs`."""

    train_blocks: str = "all"
    train_block_indices: str | None = None
    type_dims: tuple[tuple[str, int], ...] = ()
    embedder_dims: tuple[int, ...] | None = None
    split_qkv: bool = False


def parse_lumina_network_args(kwargs: Mapping[str, object]) -> LuminaNetworkArgs:
    """The Lumina keys of ``--network_args``; raises ``ValueError`` naming a bad key."""
    train_blocks = str(kwargs.get("train_blocks", "all") or "all").strip().lower()
    if train_blocks not in TRAIN_BLOCKS:
        raise ValueError(f"--network_args train_blocks={train_blocks!r}: use one of {', '.join(TRAIN_BLOCKS)}")
    return LuminaNetworkArgs(
        train_blocks=train_blocks,
        train_block_indices=kwargs.get("train_block_indices"),
        type_dims=parse_type_dims(kwargs, TYPE_DIM_KEYS),
        embedder_dims=parse_rank_list(kwargs.get("embedder_dims"), "embedder_dims", EMBEDDER_NAMES),
        split_qkv=bool(_arg_value(kwargs, "split_qkv", bool)),
    )


def _common_args(kwargs: Mapping[str, object]):
    return common_args(kwargs, _LUMINA_KEYS)


def lumina_scopes(text_encoders, dit: nn.Module | None) -> list[ModelScope]:
    """Scopes of the Gemma-2 encoder (a model or a one-element list; None skipped) and the NextDiT."""
    scopes = []
    encoders = as_list(text_encoders)
    if encoders and encoders[0] is not None:
        scopes.append(ModelScope(LORA_PREFIX_TEXT_ENCODER, encoders[0], TEXT_ENCODER_TARGET_CLASSES, te_index=0))
    if dit is not None:
        scopes.append(ModelScope(LORA_PREFIX_DIT, dit, DIT_TARGET_CLASSES))
    return scopes


def _layer_type(sub: str) -> str | None:
    """The per-type rank key of a Linear at ``sub`` inside a block (``attention.qkv`` -> attn_dim)."""
    if sub.startswith("attention."):
        return "attn_dim"
    if sub.startswith("feed_forward."):
        return "mlp_dim"
    if sub.startswith("adaLN_modulation."):
        return "mod_dim"
    return None


def _rank(args: LuminaNetworkArgs, stack: str, sub: str, dim: int) -> int:
    key = _layer_type(sub)
    if stack in ("noise_refiner", "context_refiner"):
        refiner = dict(args.type_dims).get("refiner_dim")
        if refiner is not None:
            return refiner
    return dim if key is None else args.type_dim(key, dim)


def plan_dit_modules(dit: nn.Module, dim: int, alpha: float, args: LuminaNetworkArgs) -> list[SplitPlan]:
    """The NextDiT modules ``create_network`` makes, each with its split sizes (``split_qkv``) or None."""
    if not all(hasattr(dit, name) for name in ("layers", "noise_refiner", "context_refiner", "final_layer")):
        raise ValueError(f"networks.lora_lumina: {type(dit).__name__} is not a Lumina NextDiT (no layers/refiners/"
                         "final_layer); use the network module of your model family")
    qkv_sizes = tuple(dit.config.qkv_sizes)
    planned: list[SplitPlan] = []

    def add(path: str, layer: nn.Module, rank: int) -> None:
        if rank:
            sizes = qkv_sizes if args.split_qkv and path.endswith("attention.qkv") else None
            planned.append(plan_dit_module(LORA_PREFIX_DIT, path, layer, rank, alpha, sizes))

    for stack in TRAIN_BLOCKS[args.train_blocks]:
        if stack == "final_layer":
            for sub, layer in linears(dit.final_layer):
                add(f"final_layer.{sub}", layer, _rank(args, stack, sub, dim))
            continue
        blocks = getattr(dit, stack)
        indices = (parse_block_indices(args.train_block_indices, len(blocks), "train_block_indices")
                   if stack == "layers" else range(len(blocks)))
        for index in indices:
            for sub, layer in linears(blocks[index]):
                if _layer_type(sub) is None:
                    raise ValueError(f"networks.lora_lumina: {stack}.{index}.{sub} is not a layer of the NextDiT "
                                     "layout; the model does not have the structure the LoRA format names")
                add(f"{stack}.{index}.{sub}", layer, _rank(args, stack, sub, dim))
    if args.embedder_dims:
        modules = dict(dit.named_modules())
        for rank, paths in zip(args.embedder_dims, EMBEDDER_MODULES):
            for path in paths:
                if rank:
                    add(path, modules[path], rank)
    return planned


def plan_gemma_modules(text_encoders, dim: int, alpha: float):
    """The Gemma-2 modules ``create_network`` makes: every target Linear but those of the last layer."""
    scopes = lumina_scopes(text_encoders, None)
    if not scopes:
        return []
    config = getattr(scopes[0].root, "config", None)
    last = getattr(config, "num_hidden_layers", 0) - 1
    unused = f"{LORA_PREFIX_TEXT_ENCODER}_layers_{last}_"
    return [plan for plan in plan_text_encoder_modules(scopes, dim, alpha) if not plan.lora_name.startswith(unused)]


# --- the plug-in API -------------------------------------------------------------------------

def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    dit: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """A fresh LoRA network for a NextDiT and its Gemma-2 encoder (see the module docstring).

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0. ``vae`` is unused (plug-in API).
    The network is not applied yet: call ``apply_to`` next.
    """
    common = _common_args(kwargs)
    lumina_args = parse_lumina_network_args(kwargs)
    dim, alpha = network_dim_alpha(network_dim, network_alpha)
    te_plan = [(plan, None) for plan in plan_gemma_modules(text_encoders, dim, alpha)]
    dit_plan = plan_dit_modules(dit, dim, alpha, lumina_args) if dit is not None else []
    return assemble_network([], te_plan + dit_plan, dim=dim, alpha=alpha, multiplier=multiplier,
                            neuron_dropout=neuron_dropout, common=common, num_text_encoders=1, train_t5xxl=False)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    dit: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a Lumina LoRA file, with its weights loaded: ``(network, weights_sd)``.

    Ranks and alphas come from the file (missing alpha = rank); any Linear of the NextDiT or Gemma-2
    may be adapted, so files of other trainers in kohya's format load. ``for_inference`` puts the
    network in eval mode without gradients.
    """
    # Lumina has no T5: "lora_te3" never occurs in its files, so train_t5xxl comes out False.
    return network_from_weights(lumina_scopes(text_encoders, dit), file, weights_sd, multiplier=multiplier,
                                common=_common_args(kwargs), num_text_encoders=1, t5_prefix="lora_te3",
                                for_inference=for_inference)
