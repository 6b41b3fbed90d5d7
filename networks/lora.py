"""LoRA networks for Stable Diffusion 1.x/2.x and SDXL, with the kohya-ss network-module plug-in API.

``--network_module networks.lora`` resolves to this module. The trainer calls
:func:`create_network` (or :func:`create_network_from_weights` with ``--dim_from_weights``) and
then the :class:`LoRANetwork` methods ``apply_to``, ``load_weights``, ``prepare_optimizer_params``,
``prepare_grad_etc``, ``on_epoch_start``, ``get_trainable_params``, ``save_weights``, ...

Every adapted layer gets a :class:`~networks.lora_modules.LoRAModule`::

    y = W x + up(dropout(down(x))) * multiplier * alpha / rank

Which layers, and their names in the file (these are the file format, see
``reference/lora_keys.json``):

* U-Net: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside diffusers ``Transformer2DModel`` blocks
  (attention q/k/v/out, feed-forward, ``proj_in``/``proj_out``) get ``network_dim``. With
  ``conv_dim`` also the layers of ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``: their
  3x3 convs get ``conv_dim``/``conv_alpha``, their Linear and 1x1 convs (``time_emb_proj``,
  ``conv_shortcut``) ``network_dim``/``network_alpha``. Name: ``lora_unet_`` + the module path
  with dots as underscores: the diffusers path for SD 1.x/2.x
  (``lora_unet_down_blocks_0_attentions_0_proj_in``), the original SGM path for SDXL
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``, ``..._in_layers_2``,
  ``lora_unet_input_blocks_3_0_op``, ``lora_unet_output_blocks_2_2_conv``), which is what
  ComfyUI/A1111 expect for SDXL. An SDXL U-Net is recognised from its config
  (``addition_embed_type == "text_time"``); SDXL files with diffusers paths load too (renamed to
  SGM names on load, saved with SGM names).
* Text encoder: ``q/k/v/out_proj`` of ``CLIPAttention`` (and its Sdpa/Flash variants) and
  ``fc1``/``fc2`` of ``CLIPMLP``. Name: ``lora_te_`` + the path *as transformers 4 spells it*
  (``text_model.encoder.layers.0.self_attn.q_proj``); transformers 5's ``CLIPTextModel`` dropped
  the ``text_model`` level, so it is added back explicitly. Several text encoders (SDXL) are
  ``lora_te1_``, ``lora_te2_``.

Keys: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` (0-dim).

Per-block ranks/alphas and learning-rate weights of the U-Net (``block_dims``, ``down_lr_weight``,
...) are resolved in ``networks/lora_blocks.py`` (25 blocks for SD 1.x/2.x, 23 for SDXL); they
change which modules exist and their ranks, never their names. User documentation:
``docs/lora_options.md``.

Other families reuse the pieces: a :class:`ModelScope` says how one base model's module paths
are spelled in the file and which blocks are targets; :func:`sd_scopes` (via :func:`unet_scope`)
is the one place that picks the naming scheme; :func:`plan_modules` turns scopes into planned
modules; :class:`LoRANetwork` (in ``lora_network.py``) is family-agnostic.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from library.families.sd.checkpoint.unet import UNetShape, ldm_module_path
from networks.lora_blocks import (
    BLOCK_OPTION_KEYS, SD_LAYOUT, SDXL_LAYOUT, BlockLayout, BlockOptions, parse_block_options, parse_lr_weight_options,
    sd_unet_block_index, sdxl_unet_block_index, unet_layers_per_block,
)
from networks.lora_diagnostics import format_key_list, guess_lora_kind
from networks.lora_modules import LoRAModule, is_lora_target_layer
from networks.lora_network import LoRANetwork, PlannedModule, rename_lora_keys, weights_of

logger = logging.getLogger(__name__)

__all__ = [
    "create_network",
    "create_network_from_weights",
    "LoRANetwork",
    "LoRAModule",
    "ModelScope",
    "NetworkArgs",
    "parse_network_args",
    "sd_scopes",
    "unet_scope",
    "sd_unet_scope",
    "sdxl_unet_scope",
    "is_sdxl_unet",
    "name_aliases",
    "block_layout_of",
    "plan_modules",
    "plan_from_weights",
    "ranks_from_weights",
]

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"

UNET_TARGET_CLASSES = ("Transformer2DModel",)
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# Subclasses of CLIPAttention match through the MRO; the variant names are listed as well for
# transformers releases where they are separate classes.
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

DEFAULT_NETWORK_DIM = 4
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0


# --- scopes and naming -----------------------------------------------------------------------

def _same_path(path: str) -> str | None:
    return path


def clip_text_file_path(root: nn.Module) -> Callable[[str], str]:
    """Map module paths of a CLIP text model to the file-format path (``text_model.`` level).

    transformers 4 (and ``CLIPTextModelWithProjection`` in 5) nest the transformer under
    ``text_model``; transformers 5's ``CLIPTextModel`` does not. The file format always has it,
    except for ``text_projection``, which sits beside ``text_model``.
    """
    if any(name == "text_model" for name, _ in root.named_children()):
        return _same_path

    def add_text_model(path: str) -> str:
        if path.startswith("text_model.") or path == "text_projection" or path.startswith("text_projection."):
            return path
        return f"text_model.{path}"

    return add_text_model


@dataclass(frozen=True)
class ModelScope:
    """One base model the network adapts, and how its layers are named in a LoRA file.

    ``file_path`` maps a module path of ``root`` to the path the file format uses (identity for
    the SD U-Net, diffusers -> SGM for the SDXL U-Net), ``None`` for a layer the format has no
    name for. ``te_index`` is ``None`` for the denoiser and the text encoder's position otherwise.
    ``block_index`` maps a file path (or its LoRA name without the prefix) to the block that
    per-block options address, numbered as ``block_layout`` says (see ``networks/lora_blocks.py``);
    ``None`` when the model has no such blocks. ``accepts_model_paths``: files may also name the
    layers by ``root``'s own module paths (diffusers-named SDXL LoRAs); see :meth:`name_aliases`.
    """

    prefix: str
    root: nn.Module
    target_classes: tuple[str, ...]
    conv_target_classes: tuple[str, ...] = ()
    te_index: int | None = None
    file_path: Callable[[str], str | None] = field(default=_same_path)
    block_index: Callable[[str], int | None] | None = None
    block_layout: BlockLayout | None = None
    accepts_model_paths: bool = False

    def lora_name(self, module_path: str) -> str | None:
        """The file-format name of the layer at ``module_path`` (``None``: the format has no name for it)."""
        path = self.file_path(module_path)
        return None if path is None else f"{self.prefix}_{path.replace('.', '_')}"

    def block_of(self, lora_name: str) -> int | None:
        """The block of one of this scope's LoRA names, or ``None``."""
        if self.block_index is None:
            return None
        return self.block_index(lora_name[len(self.prefix) + 1:])

    def name_aliases(self) -> dict[str, str]:
        """``{name spelled with root's module path: file-format name}`` for every adaptable layer.

        Empty unless ``accepts_model_paths``. Built by walking the model's modules, never by
        parsing underscores back into paths (``down_blocks_1`` vs ``transformer_blocks`` cannot
        be split reliably).
        """
        if not self.accepts_model_paths:
            return {}
        aliases = {}
        for path, layer in self.root.named_modules():
            if not is_lora_target_layer(layer):
                continue
            name = self.lora_name(path)
            alias = f"{self.prefix}_{path.replace('.', '_')}"
            if name is not None and alias != name:
                aliases[alias] = name
        return aliases


def _class_matches(module: nn.Module, class_names: Sequence[str]) -> bool:
    return any(cls.__name__ in class_names for cls in type(module).__mro__)


def _is_spatial_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def iter_target_layers(scope: ModelScope, include_conv_blocks: bool) -> Iterator[tuple[str, nn.Module]]:
    """``(lora_name, layer)`` for every adaptable layer inside the scope's target blocks, once each.

    Raises ``ValueError`` for a target layer the file format cannot name: the network could not
    be saved in a form other tools read.
    """
    classes = scope.target_classes + (scope.conv_target_classes if include_conv_blocks else ())
    seen: set[int] = set()
    for block_path, block in scope.root.named_modules():
        if not _class_matches(block, classes):
            continue
        for sub_path, layer in block.named_modules():
            if not is_lora_target_layer(layer) or id(layer) in seen:
                continue
            seen.add(id(layer))
            path = ".".join(p for p in (block_path, sub_path) if p)
            name = scope.lora_name(path)
            if name is None:
                raise ValueError(f"{scope.prefix}: the layer {path} has no name in the LoRA file format; the model "
                                 f"({type(scope.root).__name__}) does not have the layout the format expects")
            yield name, layer


def is_sdxl_unet(unet: nn.Module) -> bool:
    """An SDXL U-Net: a diffusers U-Net whose config adds the text/size embedding (``text_time``)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def sd_unet_scope(unet: nn.Module) -> ModelScope:
    """SD 1.x/2.x U-Net: diffusers module paths as names, 25 blocks (none if levels differ in depth)."""
    layers = unet_layers_per_block(unet)
    block_index = None if layers is None else (lambda path, L=layers: sd_unet_block_index(path, L))
    return ModelScope(LORA_PREFIX_UNET, unet, UNET_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES,
                      block_index=block_index, block_layout=SD_LAYOUT)


def sdxl_unet_scope(unet: nn.Module) -> ModelScope:
    """SDXL U-Net: SGM module paths as names (the SDXL LoRA format), 23 blocks, diffusers paths accepted.

    The diffusers -> SGM map is the checkpoint converter's own table (``ldm_module_path``), so a
    LoRA name and a checkpoint key can never disagree.
    """
    try:
        shape = UNetShape.from_diffusers_config(unet.config)
    except ValueError as e:
        raise ValueError(f"lora_unet: this SDXL U-Net (addition_embed_type='text_time') has no SGM checkpoint layout, "
                         f"which SDXL LoRA names are spelled in: {e}") from None
    return ModelScope(LORA_PREFIX_UNET, unet, UNET_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES,
                      file_path=ldm_module_path(shape), block_index=sdxl_unet_block_index,
                      block_layout=SDXL_LAYOUT, accepts_model_paths=True)


def unet_scope(unet: nn.Module) -> ModelScope:
    """The U-Net's scope: the one place that decides the U-Net naming scheme and block layout.

    Decided from the model itself (its config), never from a flag, so a network can only be
    named the way its U-Net is laid out.
    """
    return sdxl_unet_scope(unet) if is_sdxl_unet(unet) else sd_unet_scope(unet)


def sd_scopes(text_encoder: nn.Module | Sequence[nn.Module | None] | None, unet: nn.Module | None) -> list[ModelScope]:
    """Scopes for SD 1.x/2.x and SDXL: one per text encoder and the U-Net (see :func:`unet_scope`).

    A single text encoder is ``lora_te``; a list of several (SDXL: ``[CLIP-L, OpenCLIP bigG]``)
    is ``lora_te1``, ``lora_te2``, ... in list order (``None`` entries keep their number).
    """
    if text_encoder is None:
        encoders: list[nn.Module | None] = []
    elif isinstance(text_encoder, (list, tuple)):
        encoders = list(text_encoder)
    else:
        encoders = [text_encoder]
    several = len(encoders) > 1
    scopes = []
    for index, encoder in enumerate(encoders):
        if encoder is None:
            continue
        prefix = f"{LORA_PREFIX_TEXT_ENCODER}{index + 1}" if several else LORA_PREFIX_TEXT_ENCODER
        scopes.append(ModelScope(prefix, encoder, TEXT_ENCODER_TARGET_CLASSES, te_index=index, file_path=clip_text_file_path(encoder)))
    if unet is not None:
        scopes.append(unet_scope(unet))
    return scopes


def name_aliases(scopes: Sequence[ModelScope]) -> dict[str, str]:
    """Every other spelling of a module name the scopes accept, mapped to the file-format name."""
    aliases: dict[str, str] = {}
    for scope in scopes:
        aliases.update(scope.name_aliases())
    return aliases


def block_layout_of(scopes: Sequence[ModelScope]) -> BlockLayout:
    """The block numbering the block options follow: the denoiser's (SD 1.x/2.x when there is none)."""
    for scope in scopes:
        if scope.te_index is None and scope.block_layout is not None:
            return scope.block_layout
    return SD_LAYOUT


# --- planning --------------------------------------------------------------------------------

def plan_modules(
    scopes: Sequence[ModelScope],
    dim: int,
    alpha: float,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    blocks: BlockOptions | None = None,
) -> list[PlannedModule]:
    """The modules ``create_network`` makes: Linear/1x1 get ``dim``, other convs ``conv_dim``.

    With ``blocks``, modules of scopes that have blocks (the U-Net) take rank and alpha from
    their block instead, and blocks of rank 0 get no module. Raises ``ValueError`` when block
    options meet a U-Net without block numbering, or one numbered otherwise than ``blocks``.
    """
    planned = []
    for scope in scopes:
        use_blocks = blocks is not None and scope.te_index is None
        if use_blocks and scope.block_index is None:
            raise ValueError("block options (block_dims, *_lr_weight, ...) need a U-Net with the same number of "
                             "layers per level; remove them from --network_args for this model")
        if use_blocks and scope.block_layout != blocks.layout:
            raise ValueError(f"block options were resolved for the {blocks.layout.name} block layout but the U-Net is "
                             f"numbered as {scope.block_layout.name if scope.block_layout else 'no layout'}; "
                             "parse them with the U-Net's layout (block_layout_of(scopes))")
        include_conv = bool(conv_dim) or (use_blocks and blocks.conv_dims is not None and any(blocks.conv_dims))
        for name, layer in iter_target_layers(scope, include_conv_blocks=include_conv):
            spatial = _is_spatial_conv(layer)
            block = scope.block_of(name)
            if use_blocks and block is not None:
                layout = blocks.layout
                if not 0 <= block < layout.num_blocks:
                    raise ValueError(f"{name} falls in block {block}, outside the {layout.num_blocks} blocks of "
                                     f"{layout.name}: block options support only the {layout.name} U-Net layout")
                rank, module_alpha = blocks.rank_alpha(block, spatial)
            elif spatial:
                rank, module_alpha = conv_dim or 0, conv_alpha
            else:
                rank, module_alpha = dim, alpha
            if not rank:
                continue  # rank 0: this layer is deliberately not adapted
            planned.append(PlannedModule(name, layer, int(rank), module_alpha, scope.te_index, block))
    return planned


_LORA_KEY_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def ranks_from_weights(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (``lora_down`` dim 0) and alpha (``.alpha``; missing means rank)."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif suffix == "alpha":
            alphas[name] = float(value.float().reshape(-1)[0]) if value.numel() else 0.0
    for name, rank in dims.items():
        if not alphas.get(name):
            alphas[name] = float(rank)
    return dims, {name: alphas[name] for name in dims}


def plan_from_weights(scopes: Sequence[ModelScope], weights_sd: Mapping[str, torch.Tensor], source: str,
                      file_sd: Mapping[str, torch.Tensor] | None = None) -> list[PlannedModule]:
    """Modules exactly as a weights file describes them (any Linear/Conv2d of the models).

    Every layer of the models is a candidate, not only the default targets, so files that adapt
    more layers than ours (e.g. from other trainers) still load. ``weights_sd`` must already use
    the file-format names (see :func:`name_aliases` / ``rename_lora_keys``); ``file_sd`` is the
    file as read, whose names the error messages judge (default ``weights_sd``). Raises
    ``ValueError`` naming the file and what it looks like when keys are not LoRA keys or name no layer.
    """
    file_sd = weights_sd if file_sd is None else file_sd
    foreign = [k for k in weights_sd if k.partition(".")[2] not in _LORA_KEY_SUFFIXES]
    if foreign:
        raise ValueError(
            f"{source}: {len(foreign)} keys are not LoRA (lora_down/lora_up/alpha) keys, e.g. "
            f"{format_key_list(foreign)}. The file looks like {guess_lora_kind(file_sd)}."
        )
    dims, alphas = ranks_from_weights(weights_sd)
    names_in_file = {k.partition(".")[0] for k in weights_sd}
    planned, layer_names = [], set()
    for scope in scopes:
        for path, layer in scope.root.named_modules():
            if not is_lora_target_layer(layer):
                continue
            name = scope.lora_name(path)
            if name is None:
                continue
            layer_names.add(name)
            if name in dims:
                planned.append(PlannedModule(name, layer, dims[name], alphas[name], scope.te_index, scope.block_of(name)))
    unmatched = sorted(names_in_file - layer_names)
    if unmatched:
        # one name each of the models the unmatched keys were meant for, so the two spellings can be compared
        examples = [name for scope in scopes if any(n.startswith(scope.prefix + "_") for n in unmatched)
                    for name, _ in itertools.islice(iter_target_layers(scope, False), 1)]
        expected = f"; this model's names look like {', '.join(examples)}" if examples else ""
        raise ValueError(
            f"{source}: {len(unmatched)} of {len(names_in_file)} LoRA modules name no layer of the loaded models, e.g. "
            f"{format_key_list(unmatched)}. The file looks like {guess_lora_kind(file_sd)}{expected}. "
            "Load it with the base model it was trained for."
        )
    no_down = sorted(names_in_file - dims.keys())
    if no_down:
        raise ValueError(f"{source}: modules without a lora_down.weight: {format_key_list(no_down)}; the file is incomplete or corrupt.")
    return planned


# --- network_args ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkArgs:
    """``--network_args`` understood by this module, parsed from their string form."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False


def _arg_value(kwargs: Mapping[str, object], key: str, kind: type, low: float | None = None, below: float | None = None):
    raw = kwargs.get(key)
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if kind is bool:
            if isinstance(text, str):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            return bool(text)
        number = float(text)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError):
        example = {int: "4", float: "0.1", bool: "True"}[kind]
        raise ValueError(
            f"--network_args {key}={raw!r}: expected {kind.__name__} (e.g. {key}={example})"
        ) from None
    if (low is not None and number < low) or (below is not None and number >= below):
        bounds = f">= {low}" + (f" and < {below}" if below is not None else "")
        raise ValueError(f"--network_args {key}={raw!r}: must be {bounds}")
    return number


def parse_network_args(kwargs: Mapping[str, object]) -> NetworkArgs:
    """Parse ``--network_args`` (strings or already-typed values); warn about keys not used here."""
    parsed = NetworkArgs(
        conv_dim=_arg_value(kwargs, "conv_dim", int, low=0),
        conv_alpha=_arg_value(kwargs, "conv_alpha", float, low=0),
        dropout=_arg_value(kwargs, "dropout", float, low=0, below=1),
        rank_dropout=_arg_value(kwargs, "rank_dropout", float, low=0, below=1),
        module_dropout=_arg_value(kwargs, "module_dropout", float, low=0, below=1),
        loraplus_lr_ratio=_arg_value(kwargs, "loraplus_lr_ratio", float, low=0),
        loraplus_unet_lr_ratio=_arg_value(kwargs, "loraplus_unet_lr_ratio", float, low=0),
        loraplus_text_encoder_lr_ratio=_arg_value(kwargs, "loraplus_text_encoder_lr_ratio", float, low=0),
        verbose=bool(_arg_value(kwargs, "verbose", bool)),
    )
    # Block options are parsed by networks/lora_blocks.py (they depend on dim/alpha); known here.
    known = set(NetworkArgs.__dataclass_fields__) | BLOCK_OPTION_KEYS
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        logger.warning(
            "networks.lora ignores unknown --network_args %s (known: %s)", ", ".join(unknown), ", ".join(sorted(known))
        )
    return parsed


def _network_from_plan(planned: list[PlannedModule], multiplier: float, dropout: float | None, args: NetworkArgs,
                       block_lr_weights: list[float] | None = None,
                       aliases: Mapping[str, str] | None = None) -> LoRANetwork:
    te_ratio = args.loraplus_text_encoder_lr_ratio or args.loraplus_lr_ratio
    unet_ratio = args.loraplus_unet_lr_ratio or args.loraplus_lr_ratio
    network = LoRANetwork(
        planned,
        multiplier=multiplier,
        dropout=dropout,
        rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout,
        loraplus_text_encoder_lr_ratio=te_ratio,
        loraplus_unet_lr_ratio=unet_ratio,
        block_lr_weights=block_lr_weights,
        name_aliases=aliases,
    )
    if args.verbose:
        for lora in network.text_encoder_loras + network.unet_loras:
            logger.info("  %s: rank %d, alpha %g", lora.lora_name, lora.lora_dim, lora.scale * lora.lora_dim)
    return network


# --- the plug-in API -------------------------------------------------------------------------

def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """Build a fresh LoRA network for the given SD 1.x/2.x or SDXL text encoder(s) and U-Net.

    ``text_encoder``: one model (SD 1.x/2.x, ``lora_te_``) or a list (SDXL: ``[CLIP-L, bigG]``,
    ``lora_te1_``/``lora_te2_``). An SDXL U-Net (``config.addition_embed_type == "text_time"``)
    gets SGM names and the 23-block layout.

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0. ``kwargs`` are
    ``--network_args`` (strings): ``conv_dim``, ``conv_alpha`` (1.0 when ``conv_dim`` is given
    without it), ``rank_dropout``, ``module_dropout``, ``dropout`` (what the trainer injects for
    LyCORIS; used as neuron dropout when ``neuron_dropout`` is None), LoRA+ ratios
    ``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``, ``loraplus_text_encoder_lr_ratio``,
    ``verbose``, and the U-Net block options ``block_dims``, ``block_alphas``, ``conv_block_dims``,
    ``conv_block_alphas``, ``down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight``,
    ``block_lr_zero_threshold`` (see ``networks/lora_blocks.py``; 25 blocks and 12/1/12 lr weights for
    SD 1.x/2.x, 23 blocks and 9/3/9 for SDXL). ``vae`` is unused (accepted
    for the plug-in API). The network is not yet applied: call ``apply_to`` next.
    """
    args = parse_network_args(kwargs)
    dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    if dim <= 0:
        raise ValueError(f"--network_dim must be a positive integer, got {network_dim}")
    conv_alpha = None
    if args.conv_dim:
        conv_alpha = DEFAULT_CONV_ALPHA if args.conv_alpha is None else args.conv_alpha
    scopes = sd_scopes(text_encoder, unet)
    blocks = parse_block_options(kwargs, dim, alpha, args.conv_dim, conv_alpha, block_layout_of(scopes))
    planned = plan_modules(scopes, dim, alpha, args.conv_dim, conv_alpha, blocks)
    dropout = neuron_dropout if neuron_dropout is not None else args.dropout
    return _network_from_plan(planned, multiplier, dropout, args, blocks.lr_weights if blocks else None,
                              name_aliases(scopes))


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """Build a network shaped like a LoRA file and return ``(network, weights_sd)``.

    Per-module rank comes from ``lora_down.weight`` (dim 0), alpha from ``<name>.alpha``
    (missing: alpha = rank), conv modules from the adapted layer (3x3 convs get 4-D weights).
    Unlike kohya's version the weights are also loaded into the network (validated, with clear
    errors), so the result is ready for ``apply_to`` or ``merge_to``. ``kwargs`` are
    ``--network_args``; dropouts, LoRA+ ratios and block lr weights are honoured (a block whose
    weight is 0 is frozen, since its modules are in the file), dims come from the file.
    ``for_inference`` puts the network in eval mode without gradients. A diffusers-named SDXL
    file is renamed to SGM names; the returned ``weights_sd`` carries the file-format names (what
    ``merge_to`` and ``load_weights`` of this network expect).
    """
    source, weights_sd = weights_of(file, weights_sd)
    args = parse_network_args(kwargs)
    scopes = sd_scopes(text_encoder, unet)
    aliases = name_aliases(scopes)
    file_sd = weights_sd
    weights_sd = rename_lora_keys(file_sd, aliases, source)
    planned = plan_from_weights(scopes, weights_sd, source, file_sd)
    ignored = sorted(k for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas") if k in kwargs)
    if ignored:
        logger.warning("ranks come from %s: --network_args %s ignored", source, ", ".join(ignored))
    network = _network_from_plan(planned, multiplier, args.dropout, args,
                                 parse_lr_weight_options(kwargs, block_layout_of(scopes)), aliases)
    network.load_state_dict_checked(weights_sd, source)
    if for_inference:
        network.eval()
        network.requires_grad_(False)
    return network, weights_sd
