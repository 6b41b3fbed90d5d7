"""SD 1.x/2.x single-file checkpoints: LDM <-> Diffusers/transformers key maps and shape-read configs.

An original ("LDM") Stable Diffusion checkpoint holds four models under four key prefixes:

==================================  ===============================================================
``model.diffusion_model.*``         U-Net (``input_blocks``/``middle_block``/``output_blocks``)
``first_stage_model.*``             VAE (``encoder.down.i.block.j`` ...)
``cond_stage_model.transformer.*``  SD1 text encoder, CLIP ViT-L/14 (already transformers naming)
``cond_stage_model.model.*``        SD2 text encoder, OpenCLIP ViT-H/14 (fused ``in_proj``)
==================================  ===============================================================

For each part this module gives a pure function pair ``*_ldm_to_diffusers`` /
``*_diffusers_to_ldm`` plus a frozen ``*Shape`` dataclass read from tensor shapes and key
presence (never from a table of sizes). The shape object carries everything needed to map both
ways, including how the file stored tensors that our models hold in another form, so a model
loaded from a file is written back in exactly that file's layout:

- SD2 stores the U-Net ``proj_in``/``proj_out`` as Linear ``[C, C]``; our U-Net always uses 1x1
  convs (the LoRA file format needs conv-shaped ``proj_in`` for SD2), so they are reshaped on load
  and reshaped back on save (:attr:`UNetShape.stored_linear_projection`).
- The VAE attention q/k/v/proj_out are 1x1 convs in LDM files and Linear in diffusers
  (:attr:`VAEShape.attention_weight_ndim`).
- SD2's OpenCLIP has one more transformer block than the model we run: SD2 conditions on the
  penultimate layer, so we build a transformers ``CLIPTextModel`` without the last block (whose
  plain output then *is* the penultimate layer). The dropped block, ``text_projection`` and
  ``logit_scale`` are reported as unused and kept by the loader for the write-back.

Every ``*_ldm_to_diffusers`` returns a :class:`Converted`: the diffusers-layout state dict plus
which source keys it used and which keys under its prefix it did not understand, so callers keep
the rest (``model_ema.*``, ``alphas_cumprod``, ``...position_ids``) instead of losing it. Every
``*_diffusers_to_ldm`` refuses a key it cannot place, so a save never silently drops weights.

transformers 5 removed the ``text_model.`` level from ``CLIPTextModel`` module paths; the
functions here accept both namings on input and produce whichever ``hf_prefix`` asks for
(see :func:`transformers_text_prefix`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."

StateDict = Mapping[str, torch.Tensor]
TextEncoderKind = Literal["clip_l", "openclip"]


class CheckpointError(ValueError):
    """A checkpoint (or state dict) that does not have the layout the caller needs.

    The message is one line saying what is wrong, where (file/key) and how to fix it.
    """


class Converted(NamedTuple):
    """Result of an LDM -> diffusers conversion.

    ``state_dict``: the converted tensors (shared with the input where no reshape was needed).
    ``used``: the source keys that went into ``state_dict``.
    ``unused``: source keys under this part's prefix that the map does not place in the model;
    the caller must keep them if it wants to write the file back unchanged.
    """

    state_dict: dict[str, torch.Tensor]
    used: frozenset[str]
    unused: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# The renaming engine: a list of module pairs, each with the parameter names inside the module.
# --------------------------------------------------------------------------------------------

Parts = tuple[tuple[str, str], ...]


def _same(*names: str) -> Parts:
    """Inner names that are identical on both sides."""
    return tuple((n, n) for n in names)


_WEIGHT_BIAS = _same("weight", "bias")
_WEIGHT = _same("weight")


@dataclass(frozen=True)
class _Module:
    """One module on both sides: ``ldm`` and ``diffusers`` prefixes (ending in ``.``), and the
    (ldm, diffusers) inner names it holds. An inner name ending in ``.`` is a sub-module prefix,
    otherwise it must equal the whole remaining key."""

    ldm: str
    diffusers: str
    parts: Parts


def _map_inner(inner: str, parts: Parts, to_diffusers: bool) -> str | None:
    for ldm_part, diff_part in parts:
        src, dst = (ldm_part, diff_part) if to_diffusers else (diff_part, ldm_part)
        if src.endswith("."):
            if inner.startswith(src):
                return dst + inner[len(src):]
        elif inner == src:
            return dst
    return None


def _rename(state_dict: StateDict, modules: Iterable[_Module], *, to_diffusers: bool, src_prefix: str,
            dst_prefix: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename every key under ``src_prefix`` through ``modules``.

    Returns (renamed dict, used source keys, unused source keys). Module prefixes never nest, so the
    first dotted prefix of a key found in the table is its module.
    """
    table = {(m.ldm if to_diffusers else m.diffusers): m for m in modules}
    out: dict[str, torch.Tensor] = {}
    used: list[str] = []
    unused: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        new_name = None
        dot = name.find(".")
        while dot != -1:
            module = table.get(name[: dot + 1])
            if module is not None:
                inner = _map_inner(name[dot + 1:], module.parts, to_diffusers)
                if inner is not None:
                    new_name = (module.diffusers if to_diffusers else module.ldm) + inner
                break
            dot = name.find(".", dot + 1)
        if new_name is None:
            unused.append(key)
        else:
            out[dst_prefix + new_name] = tensor
            used.append(key)
    return out, used, unused


def _strip(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _indices(names: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) at the start of ``names``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := regex.match(n))})


def _require(sd: Mapping[str, torch.Tensor], key: str, prefix: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: key '{prefix}{key}' is missing; the checkpoint is incomplete or not an "
                              f"SD1/SD2 checkpoint")
    return sd[key]


def _refuse_unplaced(unused: list[str], what: str) -> None:
    if unused:
        shown = ", ".join(unused[:5]) + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else "")
        raise CheckpointError(f"{what}: cannot place {len(unused)} key(s) in the LDM layout: {shown}; the model does "
                              f"not match the shape it is being saved with")


# --------------------------------------------------------------------------------------------
# U-Net
# --------------------------------------------------------------------------------------------

# LDM ResBlock -> diffusers ResnetBlock2D.
_UNET_RESNET_PARTS: Parts = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)


def _spatial_transformer_parts(depth: int) -> Parts:
    """LDM SpatialTransformer and diffusers Transformer2DModel use the same inner names."""
    block = ("norm1.", "attn1.to_q.", "attn1.to_k.", "attn1.to_v.", "attn1.to_out.0.",
             "norm2.", "attn2.to_q.", "attn2.to_k.", "attn2.to_v.", "attn2.to_out.0.",
             "norm3.", "ff.net.0.proj.", "ff.net.2.")
    names = ["norm.", "proj_in.", "proj_out."]
    names += [f"transformer_blocks.{k}.{b}" for k in range(depth) for b in block]
    return _same(*names)


@dataclass(frozen=True)
class UNetShape:
    """A U-Net as the checkpoint shows it.

    ``down_attention[i]``: level i of the down path has cross-attention blocks; ``up_attention[u]``
    the same for diffusers up block u (deepest level first). ``transformer_depth``: transformer
    blocks per attention module. ``stored_linear_projection``: the file holds ``proj_in``/``proj_out``
    as Linear ``[C, C]`` (SD2) rather than 1x1 conv ``[C, C, 1, 1]`` (SD1); the model always uses convs.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    transformer_depth: int
    cross_attention_dim: int
    time_embed_dim: int
    stored_linear_projection: bool

    def diffusers_config(self, *, v2: bool) -> dict[str, Any]:
        """``UNet2DConditionModel`` config.

        Head counts are not in the weights: SD1 uses 8 heads in every attention (diffusers'
        misnamed ``attention_head_dim=8``), SD2 uses a head dimension of 64, i.e. channels // 64
        heads per level (at least 1). ``use_linear_projection`` is always False (1x1 conv
        ``proj_in``/``proj_out``) whatever the file stored. ``sample_size`` (64) and
        ``norm_num_groups`` (32) cannot be read from weights and are SD's values.
        """
        heads: int | tuple[int, ...] = (tuple(max(1, c // 64) for c in self.block_out_channels) if v2 else 8)
        config: dict[str, Any] = {
            "sample_size": 64,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.down_attention),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in self.up_attention),
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": self.transformer_depth,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": heads,
            "use_linear_projection": False,
        }
        if self.time_embed_dim != 4 * self.block_out_channels[0]:
            config["time_embedding_dim"] = self.time_embed_dim
        return config

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *,
                              stored_linear_projection: bool | None = None) -> UNetShape:
        """Shape of a diffusers ``UNet2DConditionModel`` config (e.g. ``unet.config``).

        ``stored_linear_projection`` says how a single file should store ``proj_in``/``proj_out``;
        by default the config's own ``use_linear_projection`` (True for SD2 Diffusers folders).
        """
        unsupported = {k: config.get(k) for k in ("class_embed_type", "addition_embed_type", "num_class_embeds",
                                                   "encoder_hid_dim_type", "time_cond_proj_dim")
                       if config.get(k) is not None}
        if unsupported or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise CheckpointError(f"U-Net config is not an SD1/SD2 U-Net (unsupported settings {unsupported}, "
                                  f"mid block {config.get('mid_block_type')}); SDXL and other variants have their "
                                  f"own trainers")
        layers = config["layers_per_block"]
        depth = config.get("transformer_layers_per_block", 1)
        if not isinstance(layers, int) or not isinstance(depth, int):
            raise CheckpointError(f"U-Net config with per-level layers_per_block={layers} / "
                                  f"transformer_layers_per_block={depth} has no SD1/SD2 single-file layout")
        channels = tuple(config["block_out_channels"])
        if stored_linear_projection is None:
            stored_linear_projection = bool(config.get("use_linear_projection", False))
        return cls(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            block_out_channels=channels,
            layers_per_block=layers,
            down_attention=tuple(t.startswith("CrossAttn") for t in config["down_block_types"]),
            up_attention=tuple(t.startswith("CrossAttn") for t in config["up_block_types"]),
            transformer_depth=depth,
            cross_attention_dim=config["cross_attention_dim"],
            time_embed_dim=config.get("time_embedding_dim") or 4 * channels[0],
            stored_linear_projection=stored_linear_projection,
        )


def _unet_modules(shape: UNetShape) -> list[_Module]:
    """Every module of the U-Net, LDM name <-> diffusers name.

    LDM numbers blocks flatly: ``input_blocks.0`` is conv_in, then per level ``layers_per_block``
    blocks of (ResBlock[, SpatialTransformer]) and, except at the last level, a downsampler block;
    ``output_blocks`` run from the deepest level with ``layers_per_block + 1`` blocks per level,
    the upsampler sitting after the attention in the last block of a level.
    """
    attention = _spatial_transformer_parts(shape.transformer_depth)
    modules = [
        _Module("time_embed.0.", "time_embedding.linear_1.", _WEIGHT_BIAS),
        _Module("time_embed.2.", "time_embedding.linear_2.", _WEIGHT_BIAS),
        _Module("input_blocks.0.0.", "conv_in.", _WEIGHT_BIAS),
        _Module("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET_PARTS),
        _Module("middle_block.1.", "mid_block.attentions.0.", attention),
        _Module("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET_PARTS),
        _Module("out.0.", "conv_norm_out.", _WEIGHT_BIAS),
        _Module("out.2.", "conv_out.", _WEIGHT_BIAS),
    ]
    levels = len(shape.block_out_channels)
    n = 1
    for level in range(levels):
        for j in range(shape.layers_per_block):
            modules.append(_Module(f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", _UNET_RESNET_PARTS))
            if shape.down_attention[level]:
                modules.append(_Module(f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{j}.", attention))
            n += 1
        if level < levels - 1:
            modules.append(_Module(f"input_blocks.{n}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.",
                                   _WEIGHT_BIAS))
            n += 1
    n = 0
    for up in range(levels):
        for j in range(shape.layers_per_block + 1):
            modules.append(_Module(f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", _UNET_RESNET_PARTS))
            upsampler_index = 1
            if shape.up_attention[up]:
                modules.append(_Module(f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{j}.", attention))
                upsampler_index = 2
            if j == shape.layers_per_block and up < levels - 1:
                modules.append(_Module(f"output_blocks.{n}.{upsampler_index}.conv.",
                                       f"up_blocks.{up}.upsamplers.0.conv.", _WEIGHT_BIAS))
            n += 1
    return modules


def _is_projection(key: str) -> bool:
    # In the U-Net only Transformer2DModel has proj_in/proj_out (the GEGLU is ff.net.0.proj).
    return key.endswith((".proj_in.weight", ".proj_out.weight"))


def infer_unet_shape(state_dict: StateDict, *, prefix: str = UNET_PREFIX) -> UNetShape:
    """Read a :class:`UNetShape` from LDM U-Net keys (under ``prefix``) and their shapes."""
    sd = _strip(state_dict, prefix)
    what = "U-Net"
    conv_in = _require(sd, "input_blocks.0.0.weight", prefix, what)
    conv_out = _require(sd, "out.2.weight", prefix, what)
    time_embed = _require(sd, "time_embed.0.weight", prefix, what)
    if "label_emb.0.0.weight" in sd:
        raise CheckpointError(f"{what}: '{prefix}label_emb.*' found: a class/size-conditioned U-Net (SDXL, SD2 "
                              f"upscaler or unCLIP) is not an SD1/SD2 text-to-image model")

    # Walk the input blocks: a block with ``.0.op`` is a downsampler and closes a level.
    levels: list[list[tuple[int, bool]]] = [[]]
    input_ids = _indices(sd, r"input_blocks\.(\d+)\.")
    if input_ids != list(range(len(input_ids))):
        raise CheckpointError(f"{what}: '{prefix}input_blocks.*' numbering has gaps {input_ids}; a weightless "
                              f"(pooling) downsampler or a damaged file is not supported")
    for n in input_ids[1:]:
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
            continue
        channels = _require(sd, f"input_blocks.{n}.0.out_layers.3.weight", prefix, what).shape[0]
        levels[-1].append((channels, f"input_blocks.{n}.1.proj_in.weight" in sd))
    layers = len(levels[0])
    if layers == 0 or any(len(level) != layers for level in levels):
        raise CheckpointError(f"{what}: levels have different block counts {[len(lv) for lv in levels]}; only a "
                              f"uniform layers_per_block is supported")
    channels = tuple(level[0][0] for level in levels)
    for level in levels:
        if len({c for c, _ in level}) != 1 or len({a for _, a in level}) != 1:
            raise CheckpointError(f"{what}: blocks within one level differ in width or attention; not an SD "
                                  f"U-Net layout")
    down_attention = tuple(level[0][1] for level in levels)

    output_ids = _indices(sd, r"output_blocks\.(\d+)\.")
    if len(output_ids) != len(levels) * (layers + 1):
        raise CheckpointError(f"{what}: expected {len(levels) * (layers + 1)} output blocks for {len(levels)} levels "
                              f"x {layers + 1}, found {len(output_ids)}")
    up_attention = tuple(
        f"output_blocks.{u * (layers + 1)}.1.proj_in.weight" in sd for u in range(len(levels)))
    if "middle_block.1.proj_in.weight" not in sd:
        raise CheckpointError(f"{what}: '{prefix}middle_block.1' has no attention; not an SD1/SD2 U-Net")

    depths: dict[str, int] = {}
    for key in sd:
        m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.transformer_blocks\.(\d+)\.", key)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    if len(set(depths.values())) != 1:
        raise CheckpointError(f"{what}: attention modules have different transformer depths "
                              f"{sorted(set(depths.values()))}; only a uniform depth is supported")
    projection = sd["middle_block.1.proj_in.weight"]
    cross = _require(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", prefix, what)
    if time_embed.shape[1] != channels[0]:
        raise CheckpointError(f"{what}: '{prefix}time_embed.0.weight' takes {time_embed.shape[1]} inputs, expected "
                              f"the first level width {channels[0]}")
    return UNetShape(
        in_channels=conv_in.shape[1],
        out_channels=conv_out.shape[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_attention=down_attention,
        up_attention=up_attention,
        transformer_depth=next(iter(depths.values())),
        cross_attention_dim=cross.shape[1],
        time_embed_dim=time_embed.shape[0],
        stored_linear_projection=projection.ndim == 2,
    )


def unet_ldm_to_diffusers(state_dict: StateDict, shape: UNetShape, *, prefix: str = UNET_PREFIX) -> Converted:
    """LDM U-Net keys under ``prefix`` -> ``UNet2DConditionModel`` state dict (1x1 conv projections)."""
    out, used, unused = _rename(state_dict, _unet_modules(shape), to_diffusers=True, src_prefix=prefix,
                                dst_prefix="")
    for key, tensor in out.items():
        if _is_projection(key) and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return Converted(out, frozenset(used), tuple(unused))


def unet_diffusers_to_ldm(state_dict: StateDict, shape: UNetShape, *, prefix: str = UNET_PREFIX
                          ) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` state dict -> LDM keys under ``prefix``, projections stored as the
    shape says. Raises :class:`CheckpointError` for a key it cannot place."""
    out, _, unused = _rename(state_dict, _unet_modules(shape), to_diffusers=False, src_prefix="", dst_prefix=prefix)
    _refuse_unplaced(unused, "U-Net")
    for key, tensor in out.items():
        if _is_projection(key):
            if shape.stored_linear_projection and tensor.ndim == 4:
                out[key] = tensor[:, :, 0, 0]
            elif not shape.stored_linear_projection and tensor.ndim == 2:
                out[key] = tensor[:, :, None, None]
    return out


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

_VAE_RESNET_PARTS: Parts = _same("norm1.", "conv1.", "norm2.", "conv2.") + (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTENTION_PARTS: Parts = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
_VAE_ATTENTION_WEIGHTS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


@dataclass(frozen=True)
class VAEShape:
    """An ``AutoencoderKL`` as the checkpoint shows it.

    ``attention_weight_ndim``: how the file stores the mid-block attention q/k/v/proj_out weights
    (4 = 1x1 conv, the LDM norm; 2 = Linear); the model always holds them as Linear.
    """

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    mid_attention: bool
    use_quant_conv: bool
    use_post_quant_conv: bool
    attention_weight_ndim: int = 4

    def diffusers_config(self) -> dict[str, Any]:
        """``AutoencoderKL`` config; ``scaling_factor`` (0.18215), ``norm_num_groups`` (32) and
        ``sample_size`` (512) are SD's values, since weights cannot show them."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "sample_size": 512,
            "scaling_factor": 0.18215,
            "mid_block_add_attention": self.mid_attention,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> VAEShape:
        """Shape of a diffusers ``AutoencoderKL`` config (e.g. ``vae.config``)."""
        return cls(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            latent_channels=config["latent_channels"],
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            mid_attention=config.get("mid_block_add_attention", True),
            use_quant_conv=config.get("use_quant_conv", True),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
        )


def _vae_modules(shape: VAEShape) -> list[_Module]:
    """Every module of the VAE. LDM numbers decoder levels from the highest resolution
    (``decoder.up.0`` is last to run); diffusers numbers ``up_blocks`` in running order."""
    modules = []
    for tower in ("encoder", "decoder"):
        modules += [
            _Module(f"{tower}.conv_in.", f"{tower}.conv_in.", _WEIGHT_BIAS),
            _Module(f"{tower}.norm_out.", f"{tower}.conv_norm_out.", _WEIGHT_BIAS),
            _Module(f"{tower}.conv_out.", f"{tower}.conv_out.", _WEIGHT_BIAS),
            _Module(f"{tower}.mid.block_1.", f"{tower}.mid_block.resnets.0.", _VAE_RESNET_PARTS),
            _Module(f"{tower}.mid.block_2.", f"{tower}.mid_block.resnets.1.", _VAE_RESNET_PARTS),
        ]
        if shape.mid_attention:
            modules.append(_Module(f"{tower}.mid.attn_1.", f"{tower}.mid_block.attentions.0.", _VAE_ATTENTION_PARTS))
    if shape.use_quant_conv:
        modules.append(_Module("quant_conv.", "quant_conv.", _WEIGHT_BIAS))
    if shape.use_post_quant_conv:
        modules.append(_Module("post_quant_conv.", "post_quant_conv.", _WEIGHT_BIAS))
    levels = len(shape.block_out_channels)
    for i in range(levels):
        for j in range(shape.layers_per_block):
            modules.append(_Module(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                                   _VAE_RESNET_PARTS))
        if i < levels - 1:
            modules.append(_Module(f"encoder.down.{i}.downsample.conv.",
                                   f"encoder.down_blocks.{i}.downsamplers.0.conv.", _WEIGHT_BIAS))
        up = levels - 1 - i
        for j in range(shape.layers_per_block + 1):
            modules.append(_Module(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.",
                                   _VAE_RESNET_PARTS))
        if i > 0:
            modules.append(_Module(f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv.",
                                   _WEIGHT_BIAS))
    return modules


def infer_vae_shape(state_dict: StateDict, *, prefix: str = VAE_PREFIX) -> VAEShape:
    """Read a :class:`VAEShape` from LDM VAE keys (under ``prefix``, which may be ``""``)."""
    sd = _strip(state_dict, prefix)
    what = "VAE"
    conv_in = _require(sd, "encoder.conv_in.weight", prefix, what)
    encoder_out = _require(sd, "encoder.conv_out.weight", prefix, what)
    decoder_out = _require(sd, "decoder.conv_out.weight", prefix, what)
    level_ids = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not level_ids or level_ids != list(range(len(level_ids))):
        raise CheckpointError(f"{what}: '{prefix}encoder.down.N' levels {level_ids} are missing or have gaps")
    layers = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    decoder_layers = len(_indices(sd, r"decoder\.up\.0\.block\.(\d+)\."))
    if decoder_layers != layers + 1:
        raise CheckpointError(f"{what}: decoder has {decoder_layers} blocks per level, expected {layers + 1} "
                              f"(encoder has {layers})")
    channels = tuple(_require(sd, f"encoder.down.{i}.block.0.conv1.weight", prefix, what).shape[0]
                     for i in level_ids)
    attention = sd.get("encoder.mid.attn_1.q.weight")
    return VAEShape(
        in_channels=conv_in.shape[1],
        out_channels=decoder_out.shape[0],
        # The encoder predicts mean and log-variance, hence twice the latent channels.
        latent_channels=encoder_out.shape[0] // 2,
        block_out_channels=channels,
        layers_per_block=layers,
        mid_attention=attention is not None,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        attention_weight_ndim=attention.ndim if attention is not None else 4,
    )


def vae_ldm_to_diffusers(state_dict: StateDict, shape: VAEShape, *, prefix: str = VAE_PREFIX) -> Converted:
    """LDM VAE keys under ``prefix`` -> ``AutoencoderKL`` state dict (attention weights as Linear)."""
    out, used, unused = _rename(state_dict, _vae_modules(shape), to_diffusers=True, src_prefix=prefix,
                                dst_prefix="")
    for key, tensor in out.items():
        if key.endswith(_VAE_ATTENTION_WEIGHTS) and tensor.ndim > 2:
            out[key] = tensor.reshape(tensor.shape[0], tensor.shape[1])
    return Converted(out, frozenset(used), tuple(unused))


def vae_diffusers_to_ldm(state_dict: StateDict, shape: VAEShape, *, prefix: str = VAE_PREFIX
                         ) -> dict[str, torch.Tensor]:
    """``AutoencoderKL`` state dict -> LDM keys under ``prefix``, attention weights in the stored form."""
    out, _, unused = _rename(state_dict, _vae_modules(shape), to_diffusers=False, src_prefix="", dst_prefix=prefix)
    _refuse_unplaced(unused, "VAE")
    for key, tensor in out.items():
        if key.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")) and ".mid.attn_1." in key:
            out[key] = tensor.reshape(*tensor.shape[:2], *([1] * (shape.attention_weight_ndim - 2)))
    return out


def infer_vae_shape_from_diffusers(state_dict: StateDict) -> VAEShape:
    """Read a :class:`VAEShape` from an ``AutoencoderKL`` state dict (diffusers key names)."""
    what = "VAE (diffusers keys)"
    sd = dict(state_dict)
    level_ids = _indices(sd, r"encoder\.down_blocks\.(\d+)\.")
    if not level_ids:
        raise CheckpointError(f"{what}: no 'encoder.down_blocks.N' keys")
    channels = tuple(_require(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "", what).shape[0]
                     for i in level_ids)
    return VAEShape(
        in_channels=_require(sd, "encoder.conv_in.weight", "", what).shape[1],
        out_channels=_require(sd, "decoder.conv_out.weight", "", what).shape[0],
        latent_channels=_require(sd, "encoder.conv_out.weight", "", what).shape[0] // 2,
        block_out_channels=channels,
        layers_per_block=len(_indices(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        mid_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )


# Diffusers before 0.14 named the VAE attention projections differently.
_OLD_DIFFUSERS_VAE_ATTENTION = {
    ".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def modernize_diffusers_vae_keys(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Rename pre-0.14 diffusers VAE attention keys (``query``/``key``/``value``/``proj_attn``)."""
    out = {}
    for key, tensor in state_dict.items():
        if ".mid_block.attentions." in key:
            for old, new in _OLD_DIFFUSERS_VAE_ATTENTION.items():
                key = key.replace(old, new)
        out[key] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------

_CLIP_LAYER_PARTS: Parts = _same(
    "self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.out_proj.",
    "layer_norm1.", "mlp.fc1.", "mlp.fc2.", "layer_norm2.")


def transformers_text_prefix(model: torch.nn.Module) -> str:
    """``"text_model."`` when this transformers version nests ``CLIPTextModel`` modules under
    ``text_model`` (transformers 4), ``""`` when it does not (transformers 5)."""
    return "text_model." if hasattr(model, "text_model") else ""


def _without_text_model(state_dict: StateDict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


@dataclass(frozen=True)
class TextEncoderShape:
    """The SD text encoder as the checkpoint shows it, and as a transformers ``CLIPTextModel``.

    ``kind``: ``"clip_l"`` (SD1, OpenAI CLIP ViT-L/14, quick-GELU) or ``"openclip"`` (SD2,
    OpenCLIP ViT-H/14, GELU). ``num_layers`` counts the layers of the model we run: for OpenCLIP
    the file holds one more (``stored_layers``) because SD2 conditions on the penultimate layer.
    ``ldm_prefix``: where the encoder lives in the file.
    """

    kind: TextEncoderKind
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    max_position_embeddings: int
    ldm_prefix: str

    @property
    def stored_layers(self) -> int:
        return self.num_layers + 1 if self.kind == "openclip" else self.num_layers

    @property
    def hidden_act(self) -> str:
        return "gelu" if self.kind == "openclip" else "quick_gelu"

    def transformers_config(self) -> dict[str, Any]:
        """``CLIPTextConfig`` keyword arguments. Head count is not in the weights: head dim 64
        (ViT-L/14: 12 heads, ViT-H/14: 16), at least one head."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": max(1, self.hidden_size // 64),
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": 1e-5,
        }

    @classmethod
    def from_transformers_config(cls, config: Any, kind: TextEncoderKind | None = None) -> TextEncoderShape:
        """Shape of a transformers ``CLIPTextConfig``; ``kind`` defaults to what ``hidden_act`` says."""
        kind = kind or text_encoder_kind_of_config(config)
        return cls(kind=kind, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   max_position_embeddings=config.max_position_embeddings,
                   ldm_prefix=OPENCLIP_PREFIX if kind == "openclip" else CLIP_PREFIX)


def text_encoder_kind_of_config(config: Any) -> TextEncoderKind:
    """SD2's OpenCLIP uses exact GELU, SD1's OpenAI CLIP quick-GELU: the one config field that tells."""
    return "openclip" if getattr(config, "hidden_act", "quick_gelu") == "gelu" else "clip_l"


def detect_text_encoder_kind(state_dict: StateDict) -> TextEncoderKind | None:
    """Which SD text encoder a single-file state dict holds, or None when it holds neither."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        return "openclip"
    if any(k.startswith("cond_stage_model.transformer.") for k in state_dict):
        return "clip_l"
    return None


def infer_text_encoder_shape(state_dict: StateDict) -> TextEncoderShape:
    """Read a :class:`TextEncoderShape` from a single-file state dict (CLIP-L or OpenCLIP keys)."""
    kind = detect_text_encoder_kind(state_dict)
    if kind == "openclip":
        prefix = OPENCLIP_PREFIX
        sd = _strip(state_dict, prefix)
        what = "SD2 text encoder (OpenCLIP)"
        tokens = _require(sd, "token_embedding.weight", prefix, what)
        positions = _require(sd, "positional_embedding", prefix, what)
        fc1 = _require(sd, "transformer.resblocks.0.mlp.c_fc.weight", prefix, what)
        stored = len(_indices(sd, r"transformer\.resblocks\.(\d+)\."))
        if stored < 2:
            raise CheckpointError(f"{what}: {stored} transformer block(s) under '{prefix}transformer.resblocks'; SD2 "
                                  f"conditions on the penultimate block, so at least 2 are needed")
        layers = stored - 1
    elif kind == "clip_l":
        # Very old SD1 files lack the ``text_model.`` level; keep whichever the file has.
        prefix = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in state_dict) else "cond_stage_model.transformer."
        sd = _strip(state_dict, prefix)
        what = "SD1 text encoder (CLIP-L)"
        tokens = _require(sd, "embeddings.token_embedding.weight", prefix, what)
        positions = _require(sd, "embeddings.position_embedding.weight", prefix, what)
        fc1 = _require(sd, "encoder.layers.0.mlp.fc1.weight", prefix, what)
        layers = len(_indices(sd, r"encoder\.layers\.(\d+)\."))
    else:
        raise CheckpointError("no text encoder: neither 'cond_stage_model.transformer.*' (SD1 CLIP-L) nor "
                              "'cond_stage_model.model.*' (SD2 OpenCLIP) keys")
    return TextEncoderShape(kind=kind, vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
                            intermediate_size=fc1.shape[0], num_layers=layers,
                            max_position_embeddings=positions.shape[0], ldm_prefix=prefix)


def _clip_modules(shape: TextEncoderShape) -> list[_Module]:
    modules = [
        _Module("embeddings.token_embedding.", "embeddings.token_embedding.", _WEIGHT),
        _Module("embeddings.position_embedding.", "embeddings.position_embedding.", _WEIGHT),
        _Module("final_layer_norm.", "final_layer_norm.", _WEIGHT_BIAS),
    ]
    modules += [_Module(f"encoder.layers.{i}.", f"encoder.layers.{i}.", _CLIP_LAYER_PARTS)
                for i in range(shape.num_layers)]
    return modules


def clip_ldm_to_diffusers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = "") -> Converted:
    """SD1 CLIP-L keys (``cond_stage_model.transformer.text_model.*``) -> ``CLIPTextModel`` keys,
    prefixed with ``hf_prefix`` (see :func:`transformers_text_prefix`). ``position_ids`` (a buffer
    some files carry, sometimes damaged) is reported unused: the model makes its own."""
    out, used, unused = _rename(state_dict, _clip_modules(shape), to_diffusers=True, src_prefix=shape.ldm_prefix,
                                dst_prefix=hf_prefix)
    return Converted(out, frozenset(used), tuple(unused))


def clip_diffusers_to_ldm(state_dict: StateDict, shape: TextEncoderShape) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict (with or without ``text_model.``) -> SD1 single-file keys."""
    out, _, unused = _rename(_without_text_model(state_dict), _clip_modules(shape), to_diffusers=False,
                             src_prefix="", dst_prefix=shape.ldm_prefix)
    _refuse_unplaced(unused, "SD1 text encoder")
    return out


# OpenCLIP block -> transformers CLIPEncoderLayer, for the unfused tensors.
_OPENCLIP_LAYER_PARTS = (
    ("ln_1.", "layer_norm1."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_OPENCLIP_TOP = (
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"),
    ("ln_final.bias", "final_layer_norm.bias"),
)


def openclip_ldm_to_diffusers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = "") -> Converted:
    """SD2 OpenCLIP keys (``cond_stage_model.model.*``) -> ``CLIPTextModel`` keys with
    ``shape.num_layers`` layers (the file's last block left out).

    The fused attention input projection ``attn.in_proj_weight`` ``[3D, D]`` is split into q, k, v
    (in that order). Unused (kept by the caller): the last block, ``text_projection``,
    ``logit_scale`` and anything else under the prefix.
    """
    p = shape.ldm_prefix
    what = "SD2 text encoder (OpenCLIP)"
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(ldm_name: str) -> torch.Tensor:
        used.add(p + ldm_name)
        if p + ldm_name not in state_dict:
            raise CheckpointError(f"{what}: key '{p}{ldm_name}' is missing; the checkpoint is incomplete")
        return state_dict[p + ldm_name]

    for ldm_name, hf_name in _OPENCLIP_TOP:
        out[hf_prefix + hf_name] = take(ldm_name)
    for i in range(shape.num_layers):
        block, layer = f"transformer.resblocks.{i}.", f"{hf_prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            # clone: views of one storage would make the state dict unsaveable by safetensors.
            q, k, v = (t.clone() for t in take(f"{block}attn.in_proj_{kind}").chunk(3, dim=0))
            out[f"{layer}self_attn.q_proj.{kind}"] = q
            out[f"{layer}self_attn.k_proj.{kind}"] = k
            out[f"{layer}self_attn.v_proj.{kind}"] = v
            for ldm_part, hf_part in _OPENCLIP_LAYER_PARTS:
                out[f"{layer}{hf_part}{kind}"] = take(f"{block}{ldm_part}{kind}")
    unused = tuple(k for k in state_dict if k.startswith(p) and k not in used)
    return Converted(out, frozenset(used), unused)


def openclip_diffusers_to_ldm(state_dict: StateDict, shape: TextEncoderShape, *,
                              kept: StateDict | None = None) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict -> the complete SD2 OpenCLIP key set of a single file.

    The tensors our model does not hold (the last block, ``text_projection``, ``logit_scale``) come
    from ``kept`` (the unused keys of the file the model was loaded from). Those ``kept`` lacks are
    made up, with a warning-worthy but harmless meaning, because SD2 never reads them: the last
    block as a copy of the model's last layer, ``text_projection`` as identity, ``logit_scale`` as
    CLIP's initial ``log(1/0.07)``; a file without them would load back one layer short.
    """
    sd = _without_text_model(state_dict)
    kept = kept or {}
    p = shape.ldm_prefix
    what = "SD2 text encoder"
    expected = {hf for _, hf in _OPENCLIP_TOP}
    out: dict[str, torch.Tensor] = {p + ldm: sd[hf] for ldm, hf in _OPENCLIP_TOP if hf in sd}

    def write_block(block_index: int, layer_index: int) -> None:
        block, layer = f"{p}transformer.resblocks.{block_index}.", f"encoder.layers.{layer_index}."
        for kind in ("weight", "bias"):
            names = [f"{layer}self_attn.{x}_proj.{kind}" for x in ("q", "k", "v")]
            names += [f"{layer}{hf_part}{kind}" for _, hf_part in _OPENCLIP_LAYER_PARTS]
            missing = [n for n in names if n not in sd]
            if missing:
                raise CheckpointError(f"{what}: transformers key '{missing[0]}' is missing; the model has fewer "
                                      f"layers than its shape ({shape.num_layers})")
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([sd[n] for n in names[:3]], dim=0)
            for (ldm_part, _), name in zip(_OPENCLIP_LAYER_PARTS, names[3:]):
                out[f"{block}{ldm_part}{kind}"] = sd[name]
            expected.update(names)

    for i in range(shape.num_layers):
        write_block(i, i)
    _refuse_unplaced(sorted(set(sd) - expected), what)

    last = f"{p}transformer.resblocks.{shape.num_layers}."
    last_keys = {k: v for k, v in kept.items() if k.startswith(last)}
    if last_keys:
        out.update(last_keys)
    else:
        before = dict(out)
        write_block(shape.num_layers, shape.num_layers - 1)
        out.update({k: v.clone() for k, v in out.items() if k not in before})
    reference = sd["embeddings.token_embedding.weight"]
    for name, make in (
        ("text_projection", lambda: torch.eye(shape.hidden_size, dtype=reference.dtype, device=reference.device)),
        ("logit_scale", lambda: torch.tensor(math.log(1 / 0.07), dtype=reference.dtype, device=reference.device)),
    ):
        out[p + name] = kept[p + name] if p + name in kept else make()
    return out


def placeholder_openclip_keys(shape: TextEncoderShape) -> list[str]:
    """The single-file keys :func:`openclip_diffusers_to_ldm` makes up when nothing was kept."""
    last = f"{shape.ldm_prefix}transformer.resblocks.{shape.num_layers}."
    parts = ["attn.in_proj_weight", "attn.in_proj_bias"] + [f"{ldm}{kind}" for ldm, _ in _OPENCLIP_LAYER_PARTS
                                                             for kind in ("weight", "bias")]
    return [last + part for part in parts] + [shape.ldm_prefix + "text_projection", shape.ldm_prefix + "logit_scale"]


def text_encoder_ldm_to_diffusers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = ""
                                  ) -> Converted:
    """Dispatch to :func:`clip_ldm_to_diffusers` or :func:`openclip_ldm_to_diffusers` by ``shape.kind``."""
    if shape.kind == "openclip":
        return openclip_ldm_to_diffusers(state_dict, shape, hf_prefix=hf_prefix)
    return clip_ldm_to_diffusers(state_dict, shape, hf_prefix=hf_prefix)


def text_encoder_diffusers_to_ldm(state_dict: StateDict, shape: TextEncoderShape, *,
                                  kept: StateDict | None = None) -> dict[str, torch.Tensor]:
    """Dispatch to :func:`clip_diffusers_to_ldm` or :func:`openclip_diffusers_to_ldm` by ``shape.kind``."""
    if shape.kind == "openclip":
        return openclip_diffusers_to_ldm(state_dict, shape, kept=kept)
    return clip_diffusers_to_ldm(state_dict, shape)
