"""LoRA networks for Stable Diffusion 1.x/2.x, with the kohya-ss network-module plug-in API.

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
  ``conv_shortcut``) ``network_dim``/``network_alpha``. Name: ``lora_unet_`` + diffusers module
  path with dots as underscores.
* Text encoder: ``q/k/v/out_proj`` of ``CLIPAttention`` (and its Sdpa/Flash variants) and
  ``fc1``/``fc2`` of ``CLIPMLP``. Name: ``lora_te_`` + the path *as transformers 4 spells it*
  (``text_model.encoder.layers.0.self_attn.q_proj``); transformers 5's ``CLIPTextModel`` dropped
  the ``text_model`` level, so it is added back explicitly. Several text encoders (SDXL) are
  ``lora_te1_``, ``lora_te2_``.

Keys: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` (0-dim).

Per-block ranks/alphas and learning-rate weights of the U-Net (``block_dims``, ``down_lr_weight``,
...) are resolved in ``networks/lora_blocks.py``; they change which modules exist and their
ranks, never their names. User documentation: ``docs/lora_options.md``.

Other families reuse the pieces: a :class:`ModelScope` says how one base model's module paths
are spelled in the file and which blocks are targets; :func:`plan_modules` turns scopes into
planned modules; :class:`LoRANetwork` (in ``lora_network.py``) is family-agnostic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from networks.lora_blocks import (
    BLOCK_OPTION_KEYS, NUM_BLOCKS, BlockOptions, parse_block_options, parse_lr_weight_options, sd_unet_block_index,
    unet_layers_per_block,
)
from networks.lora_diagnostics import format_key_list, guess_lora_kind
from networks.lora_modules import LoRAModule, is_lora_target_layer
from networks.lora_network import LoRANetwork, PlannedModule, load_weights_file

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

def _same_path(path: str) -> str:
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
    the SD U-Net; SDXL will map diffusers paths to SGM paths here). ``te_index`` is ``None`` for
    the denoiser and the text encoder's position otherwise. ``block_index`` maps a module path
    (or its LoRA name without the prefix) to the block that per-block options address (see
    ``networks/lora_blocks.py``); ``None`` when the model has no such blocks.
    """

    prefix: str
    root: nn.Module
    target_classes: tuple[str, ...]
    conv_target_classes: tuple[str, ...] = ()
    te_index: int | None = None
    file_path: Callable[[str], str] = field(default=_same_path)
    block_index: Callable[[str], int | None] | None = None

    def lora_name(self, module_path: str) -> str:
        return f"{self.prefix}_{self.file_path(module_path).replace('.', '_')}"

    def block_of(self, lora_name: str) -> int | None:
        """The block of one of this scope's LoRA names, or ``None``."""
        if self.block_index is None:
            return None
        return self.block_index(lora_name[len(self.prefix) + 1:])


def _class_matches(module: nn.Module, class_names: Sequence[str]) -> bool:
    return any(cls.__name__ in class_names for cls in type(module).__mro__)


def _is_spatial_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def iter_target_layers(scope: ModelScope, include_conv_blocks: bool) -> Iterator[tuple[str, nn.Module]]:
    """``(lora_name, layer)`` for every adaptable layer inside the scope's target blocks, once each."""
    classes = scope.target_classes + (scope.conv_target_classes if include_conv_blocks else ())
    seen: set[int] = set()
    for block_path, block in scope.root.named_modules():
        if not _class_matches(block, classes):
            continue
        for sub_path, layer in block.named_modules():
            if not is_lora_target_layer(layer) or id(layer) in seen:
                continue
            seen.add(id(layer))
            yield scope.lora_name(".".join(p for p in (block_path, sub_path) if p)), layer


def sd_scopes(text_encoder: nn.Module | Sequence[nn.Module | None] | None, unet: nn.Module | None) -> list[ModelScope]:
    """Scopes for SD 1.x/2.x: one per text encoder (``lora_te`` or ``lora_te1``...) and the U-Net."""
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
        layers = unet_layers_per_block(unet)
        block_index = None if layers is None else (lambda path, L=layers: sd_unet_block_index(path, L))
        scopes.append(ModelScope(LORA_PREFIX_UNET, unet, UNET_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES,
                                 block_index=block_index))
    return scopes


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

    With ``blocks``, modules of scopes that have blocks (the SD U-Net) take rank and alpha from
    their block instead, and blocks of rank 0 get no module. Raises ``ValueError`` when block
    options meet a U-Net whose layout has no 25-block numbering.
    """
    planned = []
    for scope in scopes:
        use_blocks = blocks is not None and scope.te_index is None
        if use_blocks and scope.block_index is None:
            raise ValueError("block options (block_dims, *_lr_weight, ...) need a U-Net with the same number of "
                             "layers per level; remove them from --network_args for this model")
        include_conv = bool(conv_dim) or (use_blocks and blocks.conv_dims is not None and any(blocks.conv_dims))
        for name, layer in iter_target_layers(scope, include_conv_blocks=include_conv):
            spatial = _is_spatial_conv(layer)
            block = scope.block_of(name)
            if use_blocks and block is not None:
                if not 0 <= block < NUM_BLOCKS:
                    raise ValueError(f"{name} falls in block {block}, outside the {NUM_BLOCKS} blocks of SD 1.x/2.x: "
                                     "block options support only the SD 1.x/2.x U-Net layout")
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


def plan_from_weights(scopes: Sequence[ModelScope], weights_sd: Mapping[str, torch.Tensor], source: str) -> list[PlannedModule]:
    """Modules exactly as a weights file describes them (any Linear/Conv2d of the models).

    Every layer of the models is a candidate, not only the default targets, so files that adapt
    more layers than ours (e.g. from other trainers) still load. Raises ``ValueError`` naming the
    file and what it looks like when keys are not LoRA keys or name no layer.
    """
    foreign = [k for k in weights_sd if k.partition(".")[2] not in _LORA_KEY_SUFFIXES]
    if foreign:
        raise ValueError(
            f"{source}: {len(foreign)} keys are not LoRA (lora_down/lora_up/alpha) keys, e.g. "
            f"{format_key_list(foreign)}. The file looks like {guess_lora_kind(weights_sd)}."
        )
    dims, alphas = ranks_from_weights(weights_sd)
    names_in_file = {k.partition(".")[0] for k in weights_sd}
    planned, layer_names = [], set()
    for scope in scopes:
        for path, layer in scope.root.named_modules():
            if not is_lora_target_layer(layer):
                continue
            name = scope.lora_name(path)
            layer_names.add(name)
            if name in dims:
                planned.append(PlannedModule(name, layer, dims[name], alphas[name], scope.te_index, scope.block_of(name)))
    unmatched = sorted(names_in_file - layer_names)
    if unmatched:
        raise ValueError(
            f"{source}: {len(unmatched)} of {len(names_in_file)} LoRA modules name no layer of the loaded models, e.g. "
            f"{format_key_list(unmatched)}. The file looks like {guess_lora_kind(weights_sd)}; "
            "load it with the base model it was trained for."
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
                       block_lr_weights: list[float] | None = None) -> LoRANetwork:
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
    """Build a fresh LoRA network for the given SD 1.x/2.x text encoder(s) and U-Net.

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0. ``kwargs`` are
    ``--network_args`` (strings): ``conv_dim``, ``conv_alpha`` (1.0 when ``conv_dim`` is given
    without it), ``rank_dropout``, ``module_dropout``, ``dropout`` (what the trainer injects for
    LyCORIS; used as neuron dropout when ``neuron_dropout`` is None), LoRA+ ratios
    ``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``, ``loraplus_text_encoder_lr_ratio``,
    ``verbose``, and the U-Net block options ``block_dims``, ``block_alphas``, ``conv_block_dims``,
    ``conv_block_alphas``, ``down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight``,
    ``block_lr_zero_threshold`` (see ``networks/lora_blocks.py``). ``vae`` is unused (accepted
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
    blocks = parse_block_options(kwargs, dim, alpha, args.conv_dim, conv_alpha)
    planned = plan_modules(sd_scopes(text_encoder, unet), dim, alpha, args.conv_dim, conv_alpha, blocks)
    dropout = neuron_dropout if neuron_dropout is not None else args.dropout
    return _network_from_plan(planned, multiplier, dropout, args, blocks.lr_weights if blocks else None)


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
    ``for_inference`` puts the network in eval mode without gradients.
    """
    source = str(file) if file is not None else "weights"
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_weights_file(file)
    weights_sd = dict(weights_sd)
    args = parse_network_args(kwargs)
    planned = plan_from_weights(sd_scopes(text_encoder, unet), weights_sd, source)
    ignored = sorted(k for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas") if k in kwargs)
    if ignored:
        logger.warning("ranks come from %s: --network_args %s ignored", source, ", ".join(ignored))
    network = _network_from_plan(planned, multiplier, args.dropout, args, parse_lr_weight_options(kwargs))
    network.load_state_dict_checked(weights_sd, source)
    if for_inference:
        network.eval()
        network.requires_grad_(False)
    return network, weights_sd
