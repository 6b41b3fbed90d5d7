"""LoRA networks for FLUX.1 (dev/schnell), with the kohya-ss network-module plug-in API.

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
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from networks.lora import (
    DEFAULT_NETWORK_ALPHA, DEFAULT_NETWORK_DIM, TEXT_ENCODER_TARGET_CLASSES, ModelScope, _arg_value,
    _network_from_plan, clip_text_file_path, plan_from_weights, parse_network_args as parse_common_args,
)
from networks.lora_modules import LoRAModule
from networks.lora_network import LoRANetwork, PlannedModule, weights_of

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "flux_scopes", "FluxNetworkArgs",
           "parse_flux_network_args", "parse_block_indices", "SplitLoRAModule"]

LORA_PREFIX_FLUX = "lora_unet"
LORA_PREFIX_CLIP_L = "lora_te1"
LORA_PREFIX_T5 = "lora_te3"

DIT_TARGET_CLASSES = ("DoubleStreamBlock", "SingleStreamBlock")
T5_TARGET_CLASSES = ("T5Attention", "T5DenseGatedActDense")

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

def parse_block_indices(text: str | None, count: int, key: str) -> list[int]:
    """``"all"`` / ``"none"`` / ``"0,2,5-10"`` -> sorted block indices in ``[0, count)``."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(range(count))
    if text.strip().lower() == "none":
        return []
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--network_args {key}={text!r}: '{part}' is not an index or a range like 5-10")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if low > high or high >= count:
            raise ValueError(f"--network_args {key}={text!r}: '{part}' is outside the model's {count} blocks "
                             f"(0-{count - 1})")
        indices.update(range(low, high + 1))
    return sorted(indices)


def _parse_in_dims(text: str | None) -> tuple[int, ...] | None:
    if text is None or not str(text).strip():
        return None
    values = [v.strip() for v in str(text).strip().strip("[]").split(",") if v.strip()]
    if len(values) != len(IN_DIM_MODULES) or not all(v.isdigit() for v in values):
        raise ValueError(f"--network_args in_dims={text!r}: give 5 ranks [img,time,vector,guidance,txt], "
                         "e.g. in_dims=[4,0,0,0,4] (0 = no LoRA on that embedder)")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class FluxNetworkArgs:
    """The FLUX-specific ``--network_args``; the common ones are :class:`networks.lora.NetworkArgs`."""

    train_blocks: str = "all"
    train_double_block_indices: str | None = None
    train_single_block_indices: str | None = None
    type_dims: tuple[tuple[str, int], ...] = ()
    in_dims: tuple[int, ...] | None = None
    split_qkv: bool = False
    train_t5xxl: bool = False

    def type_dim(self, key: str, default: int) -> int:
        return dict(self.type_dims).get(key, default)


def parse_flux_network_args(kwargs: Mapping[str, object]) -> FluxNetworkArgs:
    train_blocks = str(kwargs.get("train_blocks", "all") or "all").strip().lower()
    if train_blocks not in ("all", "single", "double"):
        raise ValueError(f"--network_args train_blocks={train_blocks!r}: use all, single or double")
    type_dims = tuple((k, _arg_value(kwargs, k, int, low=0)) for k in TYPE_DIM_KEYS
                      if _arg_value(kwargs, k, int, low=0) is not None)
    return FluxNetworkArgs(
        train_blocks=train_blocks,
        train_double_block_indices=kwargs.get("train_double_block_indices"),
        train_single_block_indices=kwargs.get("train_single_block_indices"),
        type_dims=type_dims,
        in_dims=_parse_in_dims(kwargs.get("in_dims")),
        split_qkv=bool(_arg_value(kwargs, "split_qkv", bool)),
        train_t5xxl=bool(_arg_value(kwargs, "train_t5xxl", bool)),
    )


def _common_args(kwargs: Mapping[str, object]):
    # networks.lora warns about keys it does not know; the FLUX keys are known here.
    return parse_common_args({k: v for k, v in kwargs.items() if k not in _FLUX_KEYS})


# --- scopes ----------------------------------------------------------------------------------

def _as_list(text_encoders) -> list[nn.Module | None]:
    if text_encoders is None:
        return []
    if isinstance(text_encoders, (list, tuple)):
        return list(text_encoders)
    return [text_encoders]


def flux_scopes(text_encoders, flux: nn.Module | None, *, include_t5: bool = True) -> list[ModelScope]:
    """Scopes of ``[CLIP-L, T5-XXL]`` (either may be None) and the DiT, with the file-format prefixes."""
    encoders = _as_list(text_encoders)
    scopes = []
    if len(encoders) > 0 and encoders[0] is not None:
        scopes.append(ModelScope(LORA_PREFIX_CLIP_L, encoders[0], TEXT_ENCODER_TARGET_CLASSES, te_index=0,
                                 file_path=clip_text_file_path(encoders[0])))
    if include_t5 and len(encoders) > 1 and encoders[1] is not None:
        scopes.append(ModelScope(LORA_PREFIX_T5, encoders[1], T5_TARGET_CLASSES, te_index=1))
    if flux is not None:
        scopes.append(ModelScope(LORA_PREFIX_FLUX, flux, DIT_TARGET_CLASSES))
    return scopes


def _linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for path, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            yield path, layer


def _split_sizes(path: str, layer: nn.Linear, flux: nn.Module) -> tuple[int, ...] | None:
    """Output sizes of the parts fused in ``layer`` (q, k, v [, mlp]), None for unfused layers."""
    hidden = layer.in_features
    if path.endswith("attn.qkv"):
        return (layer.out_features // 3,) * 3
    if path.endswith("linear1"):
        mlp = layer.out_features - 3 * hidden
        return (hidden, hidden, hidden, mlp)
    return None


def plan_dit_modules(flux: nn.Module, dim: int, alpha: float, args: FluxNetworkArgs
                     ) -> list[tuple[PlannedModule, tuple[int, ...] | None]]:
    """The DiT modules ``create_network`` makes, each with its split sizes (``split_qkv``) or None."""
    double_blocks = getattr(flux, "double_blocks", None)
    single_blocks = getattr(flux, "single_blocks", None)
    if double_blocks is None or single_blocks is None:
        raise ValueError(f"networks.lora_flux: {type(flux).__name__} is not a FLUX DiT (no double_blocks/"
                         "single_blocks); use the network module of your model family")
    planned: list[tuple[PlannedModule, tuple[int, ...] | None]] = []

    def add(path: str, layer: nn.Linear, rank: int) -> None:
        if not rank:
            return
        sizes = _split_sizes(path, layer, flux) if args.split_qkv else None
        parts = len(sizes) if sizes else 1
        name = f"{LORA_PREFIX_FLUX}_{path.replace('.', '_')}"
        planned.append((PlannedModule(name, layer, rank * parts, alpha * parts), sizes))

    groups = []
    if args.train_blocks in ("all", "double"):
        indices = parse_block_indices(args.train_double_block_indices, len(double_blocks), "train_double_block_indices")
        groups.append(("double_blocks", double_blocks, indices, _DOUBLE_TYPES))
    if args.train_blocks in ("all", "single"):
        indices = parse_block_indices(args.train_single_block_indices, len(single_blocks), "train_single_block_indices")
        groups.append(("single_blocks", single_blocks, indices, _SINGLE_TYPES))
    for kind, blocks, indices, types in groups:
        for index in indices:
            for sub, layer in _linears(blocks[index]):
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
                    logger.warning("in_dims: this FLUX model has no %s (schnell has no guidance_in); skipped", path)
                    continue
                if rank:
                    add(path, modules[path], rank)
    return planned


def plan_text_encoder_modules(scopes: Sequence[ModelScope], dim: int, alpha: float) -> list[PlannedModule]:
    planned = []
    for scope in scopes:
        if scope.te_index is None:
            continue
        for block_path, block in scope.root.named_modules():
            if not any(cls.__name__ in scope.target_classes for cls in type(block).__mro__):
                continue
            for sub, layer in _linears(block):
                path = ".".join(p for p in (block_path, sub) if p)
                planned.append(PlannedModule(scope.lora_name(path), layer, dim, alpha, scope.te_index))
    return planned


# --- split q/k/v -----------------------------------------------------------------------------

class SplitLoRAModule(LoRAModule):
    """A LoRA on a fused layer (``qkv``, ``linear1``) trained as one independent LoRA per part.

    Stored as one standard LoRA of rank ``parts x r`` whose ``lora_up`` is block-diagonal: part
    ``i``'s outputs only see rank channels ``i*r .. (i+1)*r``. The mask is applied in the forward
    (and off-diagonal weights start at zero and get zero gradient), so the file needs no
    conversion to load anywhere a FLUX LoRA loads.
    """

    def __init__(self, *args, split_sizes: Sequence[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        parts = len(split_sizes)
        if self.lora_dim % parts or sum(split_sizes) != self.lora_up.weight.shape[0]:
            raise ValueError(f"{self.lora_name}: split sizes {list(split_sizes)} do not fit rank {self.lora_dim} "
                             f"and {self.lora_up.weight.shape[0]} outputs")
        rank = self.lora_dim // parts
        mask = torch.zeros_like(self.lora_up.weight)
        start = 0
        for i, size in enumerate(split_sizes):
            mask[start:start + size, i * rank:(i + 1) * rank] = 1.0
            start += size
        self.register_buffer("up_mask", mask, persistent=False)
        self.register_load_state_dict_post_hook(SplitLoRAModule._mask_loaded_up)

    def _masked_up(self, lx: torch.Tensor) -> torch.Tensor:
        weight = self.lora_up.weight * self.up_mask.to(self.lora_up.weight.dtype)
        return nn.functional.linear(lx, weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand((), device="cpu") < self.module_dropout:
            return org_out
        lx = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = nn.functional.dropout(lx, p=self.dropout, training=True)
            if self.rank_dropout:
                keep = torch.rand((lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.lora_dim,), device=lx.device)
                lx = lx * (keep >= self.rank_dropout).to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return org_out + self._masked_up(lx) * (self.multiplier * scale)

    @staticmethod
    def _mask_loaded_up(module: "SplitLoRAModule", incompatible_keys) -> None:
        # A load_state_dict *post* hook: torch loads a module's own tensors before its children's,
        # so in _load_from_state_dict lora_up would still hold its old values.
        with torch.no_grad():
            weight = module.lora_up.weight
            if weight.is_meta:
                return
            # A file from a plain LoRA has dense up weights; the split network can only hold the
            # block-diagonal part, so say what is dropped instead of silently changing it.
            outside = (weight * (1 - module.up_mask.to(weight.dtype))).abs().sum()
            if float(outside) > 0:
                logger.warning("%s: the file's lora_up is not block-diagonal; split_qkv keeps only the "
                               "per-part blocks", module.lora_name)
                weight.mul_(module.up_mask.to(weight.dtype))


def _use_split_modules(network: LoRANetwork, splits: Mapping[str, tuple[PlannedModule, tuple[int, ...]]],
                       multiplier: float, dropout, common) -> None:
    """Replace the planned plain modules of fused layers by :class:`SplitLoRAModule` s."""
    for index, lora in enumerate(network.unet_loras):
        if lora.lora_name not in splits:
            continue
        # The alpha comes from the plan, not from the module's buffer: reading a buffer is a host
        # sync, and impossible for a shape-only (meta) model.
        plan, sizes = splits[lora.lora_name]
        split = SplitLoRAModule(lora.lora_name, lora.org_module, multiplier, plan.rank,
                                plan.alpha, dropout=dropout, rank_dropout=common.rank_dropout,
                                module_dropout=common.module_dropout, split_sizes=sizes)
        network.add_module(lora.lora_name, split)
        network.unet_loras[index] = split


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
    dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    if dim <= 0:
        raise ValueError(f"--network_dim must be a positive integer, got {network_dim}")
    scopes = flux_scopes(text_encoders, None, include_t5=flux_args.train_t5xxl)
    planned = plan_text_encoder_modules(scopes, dim, alpha)
    dit_plan = plan_dit_modules(flux, dim, alpha, flux_args) if flux is not None else []
    planned += [plan for plan, _ in dit_plan]
    dropout = neuron_dropout if neuron_dropout is not None else common.dropout
    network = _network_from_plan(planned, multiplier, dropout, common)
    splits = {plan.lora_name: (plan, sizes) for plan, sizes in dit_plan if sizes}
    if splits:
        _use_split_modules(network, splits, multiplier, dropout, common)
    network.train_t5xxl = flux_args.train_t5xxl
    network.num_text_encoders = 2  # --text_encoder_lr CLIP-L T5, whether or not T5 has modules
    return network


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
    source, weights_sd = weights_of(file, weights_sd)
    common = _common_args(kwargs)
    scopes = flux_scopes(text_encoders, flux)
    planned = plan_from_weights(scopes, weights_sd, source)
    network = _network_from_plan(planned, multiplier, common.dropout, common)
    network.load_state_dict_checked(weights_sd, source)
    network.train_t5xxl = any(k.startswith(LORA_PREFIX_T5 + "_") for k in weights_sd)
    network.num_text_encoders = 2
    if for_inference:
        network.eval()
        network.requires_grad_(False)
    return network, dict(weights_sd)
