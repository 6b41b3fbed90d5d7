"""SD 1.x/2.x and SDXL U-Net: LDM/SGM (``model.diffusion_model.*``) <-> diffusers
``UNet2DConditionModel`` key map and the :class:`UNetShape` read from a checkpoint.

SDXL's U-Net is the same LDM design with three differences the shape records: a per-level
transformer depth (SDXL: none, 2, 10; the middle block 10), the ``label_emb`` MLP that embeds the
pooled text and size/crop vector (diffusers ``add_embedding``), and ``proj_in``/``proj_out`` kept
as Linear in the model (the SDXL LoRA format has Linear-shaped projections).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .common import (
    _WEIGHT_BIAS,
    UNET_PREFIX,
    CheckpointError,
    Converted,
    Parts,
    StateDict,
    _indices,
    _map_inner,
    _Module,
    _refuse_unplaced,
    _rename,
    _require,
    _same,
    _strip,
)

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
    blocks per attention module, an int when every attention module has the same depth (SD1/SD2),
    else a tuple per down level (SDXL; 0 where a level has no attention). ``mid_transformer_depth``:
    the middle block's depth (None: same as ``transformer_depth``). ``stored_linear_projection``:
    the file holds ``proj_in``/``proj_out`` as Linear ``[C, C]`` (SD2, SDXL) rather than 1x1 conv
    ``[C, C, 1, 1]`` (SD1). ``adm_in_channels``: input width of ``label_emb`` (SDXL's pooled text +
    size/crop embedding, 2816), None without one. ``addition_time_embed_dim``: width of each of the
    six size/crop sinusoidal embeddings (SDXL 256; not in the U-Net weights, the loader derives it
    from the text encoder's pooled width).
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    transformer_depth: int | tuple[int, ...]
    cross_attention_dim: int
    time_embed_dim: int
    stored_linear_projection: bool
    mid_transformer_depth: int | None = None
    adm_in_channels: int | None = None
    addition_time_embed_dim: int = 256

    @property
    def is_sdxl(self) -> bool:
        return self.adm_in_channels is not None

    @property
    def model_linear_projection(self) -> bool:
        """The model holds Linear projections: SDXL (its LoRA format needs them); SD1/SD2 use 1x1 convs."""
        return self.is_sdxl

    def depth_of_level(self, level: int) -> int:
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[level]

    @property
    def mid_depth(self) -> int:
        if self.mid_transformer_depth is not None:
            return self.mid_transformer_depth
        return self.depth_of_level(len(self.block_out_channels) - 1)

    def diffusers_config(self, *, v2: bool = False) -> dict[str, Any]:
        """``UNet2DConditionModel`` config.

        Head counts are not in the weights: SD1 uses 8 heads in every attention (diffusers'
        misnamed ``attention_head_dim=8``), SD2 and SDXL a head dimension of 64, i.e. channels // 64
        heads per level (at least 1). ``use_linear_projection`` follows
        :attr:`model_linear_projection`, whatever the file stored. ``sample_size`` (64; SDXL 128)
        and ``norm_num_groups`` (32) cannot be read from weights and are SD's values.
        """
        per_level_heads = v2 or self.is_sdxl
        heads: int | tuple[int, ...] = (tuple(max(1, c // 64) for c in self.block_out_channels)
                                        if per_level_heads else 8)
        depth: int | tuple[int, ...] = self.transformer_depth
        if not isinstance(depth, int):
            # diffusers needs a depth for levels without attention too; it builds nothing from it.
            depth = tuple(d or 1 for d in depth)
        config: dict[str, Any] = {
            "sample_size": 128 if self.is_sdxl else 64,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.down_attention),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in self.up_attention),
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": depth,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": heads,
            "use_linear_projection": self.model_linear_projection,
        }
        if self.time_embed_dim != 4 * self.block_out_channels[0]:
            config["time_embedding_dim"] = self.time_embed_dim
        if self.is_sdxl:
            config.update(addition_embed_type="text_time", addition_time_embed_dim=self.addition_time_embed_dim,
                          projection_class_embeddings_input_dim=self.adm_in_channels)
        return config

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *,
                              stored_linear_projection: bool | None = None) -> UNetShape:
        """Shape of a diffusers ``UNet2DConditionModel`` config (e.g. ``unet.config``).

        ``stored_linear_projection`` says how a single file should store ``proj_in``/``proj_out``;
        by default the config's own ``use_linear_projection`` (True for SD2 Diffusers folders).
        """
        unsupported = {k: config.get(k) for k in ("class_embed_type", "num_class_embeds",
                                                   "encoder_hid_dim_type", "time_cond_proj_dim")
                       if config.get(k) is not None}
        addition = config.get("addition_embed_type")
        if addition not in (None, "text_time"):
            unsupported["addition_embed_type"] = addition
        if unsupported or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise CheckpointError(f"U-Net config is not an SD1/SD2/SDXL U-Net (unsupported settings {unsupported}, "
                                  f"mid block {config.get('mid_block_type')})")
        layers = config["layers_per_block"]
        depth = config.get("transformer_layers_per_block", 1)
        if isinstance(depth, (list, tuple)):
            depth = tuple(int(d) for d in depth)
            if len(set(depth)) == 1:
                depth = depth[0]
        if not isinstance(layers, int) or (not isinstance(depth, int) and any(isinstance(d, (list, tuple))
                                                                               for d in depth)):
            raise CheckpointError(f"U-Net config with per-level layers_per_block={layers} / "
                                  f"transformer_layers_per_block={depth} has no single-file layout")
        channels = tuple(config["block_out_channels"])
        if stored_linear_projection is None:
            stored_linear_projection = bool(config.get("use_linear_projection", False))
        down_attention = tuple(t.startswith("CrossAttn") for t in config["down_block_types"])
        if not isinstance(depth, int):
            depth = tuple(d if a else 0 for d, a in zip(depth, down_attention))
        sdxl = addition == "text_time"
        return cls(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            block_out_channels=channels,
            layers_per_block=layers,
            down_attention=down_attention,
            up_attention=tuple(t.startswith("CrossAttn") for t in config["up_block_types"]),
            transformer_depth=depth,
            cross_attention_dim=config["cross_attention_dim"],
            time_embed_dim=config.get("time_embedding_dim") or 4 * channels[0],
            stored_linear_projection=stored_linear_projection,
            adm_in_channels=config.get("projection_class_embeddings_input_dim") if sdxl else None,
            addition_time_embed_dim=config.get("addition_time_embed_dim") or 256,
        )


def _unet_modules(shape: UNetShape) -> list[_Module]:
    """Every module of the U-Net, LDM name <-> diffusers name.

    LDM numbers blocks flatly: ``input_blocks.0`` is conv_in, then per level ``layers_per_block``
    blocks of (ResBlock[, SpatialTransformer]) and, except at the last level, a downsampler block;
    ``output_blocks`` run from the deepest level with ``layers_per_block + 1`` blocks per level,
    the upsampler sitting after the attention in the last block of a level.
    """
    modules = [
        _Module("time_embed.0.", "time_embedding.linear_1.", _WEIGHT_BIAS),
        _Module("time_embed.2.", "time_embedding.linear_2.", _WEIGHT_BIAS),
        _Module("input_blocks.0.0.", "conv_in.", _WEIGHT_BIAS),
        _Module("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET_PARTS),
        _Module("middle_block.1.", "mid_block.attentions.0.", _spatial_transformer_parts(shape.mid_depth)),
        _Module("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET_PARTS),
        _Module("out.0.", "conv_norm_out.", _WEIGHT_BIAS),
        _Module("out.2.", "conv_out.", _WEIGHT_BIAS),
    ]
    if shape.is_sdxl:
        modules += [_Module("label_emb.0.0.", "add_embedding.linear_1.", _WEIGHT_BIAS),
                    _Module("label_emb.0.2.", "add_embedding.linear_2.", _WEIGHT_BIAS)]
    levels = len(shape.block_out_channels)
    n = 1
    for level in range(levels):
        attention = _spatial_transformer_parts(shape.depth_of_level(level))
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
        attention = _spatial_transformer_parts(shape.depth_of_level(levels - 1 - up))
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
    """Read a :class:`UNetShape` from LDM/SGM U-Net keys (under ``prefix``) and their shapes.

    SD1/SD2 and SDXL alike; an SDXL U-Net is recognised by ``label_emb`` (``adm_in_channels``).
    The caller checks that the U-Net is the family it trains.
    """
    sd = _strip(state_dict, prefix)
    what = "U-Net"
    conv_in = _require(sd, "input_blocks.0.0.weight", prefix, what)
    conv_out = _require(sd, "out.2.weight", prefix, what)
    time_embed = _require(sd, "time_embed.0.weight", prefix, what)
    adm_in_channels = None
    if "label_emb.0.0.weight" in sd:
        if "label_emb.0.2.weight" not in sd or sd["label_emb.0.0.weight"].ndim != 2:
            raise CheckpointError(f"{what}: '{prefix}label_emb.*' is not SDXL's two-layer size/pooled-text MLP "
                                  f"(a class-conditioned upscaler or unCLIP U-Net is not supported)")
        adm_in_channels = sd["label_emb.0.0.weight"].shape[1]

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
        raise CheckpointError(f"{what}: '{prefix}middle_block.1' has no attention; not an SD U-Net")

    # Transformer depth of every attention module, grouped by level (the middle block apart).
    depths: dict[str, int] = {}
    for key in sd:
        m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.transformer_blocks\.(\d+)\.", key)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    level_depths: list[set[int]] = [set() for _ in levels]
    n = 1
    for level, blocks in enumerate(levels):
        for _ in blocks:
            if f"input_blocks.{n}.1" in depths:
                level_depths[level].add(depths[f"input_blocks.{n}.1"])
            n += 1
        n += 1  # the downsampler block
    for u in range(len(levels)):
        for j in range(layers + 1):
            name = f"output_blocks.{u * (layers + 1) + j}.1"
            if name in depths:
                level_depths[len(levels) - 1 - u].add(depths[name])
    if any(len(d) > 1 for d in level_depths):
        raise CheckpointError(f"{what}: attention modules of one level have different transformer depths "
                              f"{[sorted(d) for d in level_depths]}; not an SD U-Net layout")
    per_level = tuple(next(iter(d)) if d else 0 for d in level_depths)
    with_attention = {d for d in per_level if d}
    mid_depth = depths["middle_block.1"]
    transformer_depth: int | tuple[int, ...]
    if len(with_attention) == 1 and mid_depth in with_attention:
        transformer_depth, mid_override = next(iter(with_attention)), None
    else:
        transformer_depth = per_level
        mid_override = None if per_level[-1] == mid_depth else mid_depth
    if adm_in_channels is None and not isinstance(transformer_depth, int):
        raise CheckpointError(f"{what}: attention modules have different transformer depths {per_level} (middle "
                              f"{mid_depth}) but no label_emb; not an SD1/SD2 or SDXL U-Net")
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
        transformer_depth=transformer_depth,
        cross_attention_dim=cross.shape[1],
        time_embed_dim=time_embed.shape[0],
        stored_linear_projection=projection.ndim == 2,
        mid_transformer_depth=mid_override,
        adm_in_channels=adm_in_channels,
    )


def unet_ldm_to_diffusers(state_dict: StateDict, shape: UNetShape, *, prefix: str = UNET_PREFIX) -> Converted:
    """LDM U-Net keys under ``prefix`` -> ``UNet2DConditionModel`` state dict, projections shaped as
    :attr:`UNetShape.model_linear_projection` says."""
    out, used, unused = _rename(state_dict, _unet_modules(shape), to_diffusers=True, src_prefix=prefix,
                                dst_prefix="")
    for key, tensor in out.items():
        if _is_projection(key):
            if shape.model_linear_projection and tensor.ndim == 4:
                out[key] = tensor[:, :, 0, 0]
            elif not shape.model_linear_projection and tensor.ndim == 2:
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


def ldm_module_path(shape: UNetShape) -> Callable[[str], str | None]:
    """A function mapping a diffusers ``UNet2DConditionModel`` module path to its LDM/SGM path.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``down_blocks.0.resnets.0.conv1`` ->
    ``input_blocks.1.0.in_layers.2``; None for a path with no LDM counterpart. SDXL LoRA files name
    U-Net modules this way. The same module table as the checkpoint conversion is used, so a LoRA
    name and a checkpoint key can never disagree.
    """
    table = {m.diffusers: m for m in _unet_modules(shape)}

    def convert(path: str) -> str | None:
        dotted = path + "."
        dot = dotted.find(".")
        while dot != -1:
            module = table.get(dotted[: dot + 1])
            if module is not None:
                inner = dotted[dot + 1:]
                if not inner:  # the whole module (e.g. ``...downsamplers.0.conv``)
                    return module.ldm[:-1]
                mapped = _map_inner(inner, module.parts, to_diffusers=False)
                return None if mapped is None else (module.ldm + mapped).rstrip(".")
            dot = dotted.find(".", dot + 1)
        return None

    return convert
