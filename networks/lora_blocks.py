"""Per-block LoRA options for the SD 1.x/2.x and SDXL U-Nets: block ranks/alphas and block learning rates.

The options (``--network_args`` of ``networks.lora``) address the U-Net in blocks numbered as in
the original latent-diffusion (LDM/SGM) checkpoint. SD 1.x/2.x has 25 (:data:`SD_LAYOUT`)::

    0..11   input_blocks.0 .. input_blocks.11     ("down", 12 values of down_lr_weight)
    12      middle_block                           ("mid", 1 value of mid_lr_weight)
    13..24  output_blocks.0 .. output_blocks.11    ("up", 12 values of up_lr_weight)

SDXL has 23 (:data:`SDXL_LAYOUT`), kohya's numbering: the middle block counts as three blocks
and the embeddings and the output head have a block each::

    0       time_embed, label_emb                  (no down/mid/up weight: lr weight 1)
    1..9    input_blocks.0 .. input_blocks.8       ("down", 9 values)
    10..12  middle_block.0 .. middle_block.2       ("mid", 3 values)
    13..21  output_blocks.0 .. output_blocks.8     ("up", 9 values)
    22      out                                    (lr weight 1)

Options: ``block_dims``/``block_alphas`` (rank/alpha of Linear and 1x1-conv modules per block),
``conv_block_dims``/``conv_block_alphas`` (rank/alpha of 3x3-conv modules per block), one
comma-separated value per block; ``down_lr_weight``/``mid_lr_weight``/``up_lr_weight`` (lr
multipliers per block, lists or presets) and ``block_lr_zero_threshold``. A rank of 0, or an lr
weight that ends up 0, means the block gets no modules. Module *names* never change, so a file
trained with block options holds a subset of the usual keys and loads anywhere a normal LoRA does.

The text encoder is not divided into blocks; these options only touch U-Net modules.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "NUM_DOWN_BLOCKS", "NUM_MID_BLOCKS", "NUM_UP_BLOCKS", "NUM_BLOCKS", "MID_BLOCK_INDEX",
    "BLOCK_OPTION_KEYS", "BlockLayout", "SD_LAYOUT", "SDXL_LAYOUT", "BlockOptions", "sd_unet_block_index",
    "sdxl_unet_block_index", "lr_weight_preset", "parse_lr_weights", "parse_block_options",
    "parse_lr_weight_options", "unet_layers_per_block",
]

NUM_DOWN_BLOCKS = 12
NUM_MID_BLOCKS = 1
NUM_UP_BLOCKS = 12
NUM_BLOCKS = NUM_DOWN_BLOCKS + NUM_MID_BLOCKS + NUM_UP_BLOCKS  # 25
MID_BLOCK_INDEX = NUM_DOWN_BLOCKS  # 12
FIRST_UP_BLOCK_INDEX = NUM_DOWN_BLOCKS + NUM_MID_BLOCKS  # 13

BLOCK_OPTION_KEYS = frozenset({
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
})

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass(frozen=True)
class BlockLayout:
    """How a U-Net's blocks are numbered for the block options, and which of them each option addresses.

    Blocks run ``0 .. num_blocks - 1``: ``leading`` blocks no lr weight addresses, then the
    ``num_down`` blocks of ``down_lr_weight``, the ``num_mid`` of ``mid_lr_weight``, the ``num_up``
    of ``up_lr_weight`` and ``trailing`` unaddressed blocks (lr weight 1). ``parts`` spells the
    blocks out for error messages.
    """

    name: str
    num_down: int
    num_mid: int
    num_up: int
    parts: str
    leading: int = 0
    trailing: int = 0

    @property
    def num_blocks(self) -> int:
        return self.leading + self.num_down + self.num_mid + self.num_up + self.trailing

    def lr_weights(self, down: Sequence[float], mid: Sequence[float], up: Sequence[float]) -> list[float]:
        """One weight per block from the three option lists; unaddressed blocks get 1.0."""
        return [1.0] * self.leading + list(down) + list(mid) + list(up) + [1.0] * self.trailing


SD_LAYOUT = BlockLayout("SD 1.x/2.x", NUM_DOWN_BLOCKS, NUM_MID_BLOCKS, NUM_UP_BLOCKS,
                        f"{NUM_DOWN_BLOCKS} down, {NUM_MID_BLOCKS} mid, {NUM_UP_BLOCKS} up")
SDXL_LAYOUT = BlockLayout("SDXL", 9, 3, 9, "base, 9 input, 3 middle, 9 output, out", leading=1, trailing=1)
KNOWN_LAYOUTS = (SD_LAYOUT, SDXL_LAYOUT)

# Dots (module paths) or underscores (LoRA file names) between the parts: both spell the same path.
_UP_DOWN = re.compile(r"^(down|up)_blocks[._](\d+)[._](resnets|attentions|downsamplers|upsamplers)[._](\d+)(?:[._]|$)")
_MID = re.compile(r"^mid_block(?:[._]|$)")
_CONV_IN = re.compile(r"^conv_in(?:[._]|$)")


def sd_unet_block_index(module_path: str, layers_per_block: int = 2) -> int | None:
    """The block (0..24) of a diffusers SD U-Net module path, or ``None`` outside the 25 blocks.

    ``module_path`` is relative to the U-Net, spelled with dots (``down_blocks.1.attentions.0.proj_in``)
    or with underscores as in LoRA names (``down_blocks_1_attentions_0_proj_in``; a ``lora_unet_``
    prefix is ignored). ``L = layers_per_block`` (2 for SD 1.x/2.x).

    Why these numbers: the LDM U-Net is a flat list. ``input_blocks.0`` is the stem conv; then
    each resolution level ``i`` contributes ``L`` blocks of (resnet [+ attention]) and, except the
    last level, one block holding only the downsampler. So level ``i`` starts at ``1 + i*(L+1)``:

    * ``conv_in`` -> 0
    * ``down_blocks.i.resnets.j`` / ``down_blocks.i.attentions.j`` -> ``1 + i*(L+1) + j``
      (resnet ``j`` and attention ``j`` share an LDM block)
    * ``down_blocks.i.downsamplers.0`` -> ``1 + i*(L+1) + L`` (SD: 3, 6, 9)
    * ``mid_block.*`` (both resnets and the attention) -> 12, the single ``middle_block``

    On the way up each level has ``L+1`` blocks of (resnet [+ attention]); the upsampler sits in
    the level's last block (``output_blocks.k.1`` or ``.2`` in LDM), so for output block ``k``:

    * ``up_blocks.i.resnets.j`` / ``up_blocks.i.attentions.j`` -> ``k = i*(L+1) + j``
    * ``up_blocks.i.upsamplers.0`` -> ``k = i*(L+1) + L``

    and the block index is ``13 + k``. ``conv_out``, ``conv_norm_out``, ``time_embedding`` and
    class/addition embeddings are outside ``input_blocks``/``middle_block``/``output_blocks`` in
    LDM (``out``, ``time_embed``, ``label_emb``), so they have no block: ``None``. (No LoRA target
    lives there by default anyway, nor in ``conv_in``.)

    With ``L = 2`` and 4 levels this covers exactly 0..24. A smaller U-Net (e.g. the 2-level,
    ``L = 1`` test model) uses a subset of the same numbers: its blocks are the LDM blocks it
    would have. A result past 11 for a down path or past 24 for an up path means the U-Net is
    larger than SD's; callers reject that when block options are used.
    """
    path = module_path[len("lora_unet_"):] if module_path.startswith("lora_unet_") else module_path
    per_level = layers_per_block + 1
    match = _UP_DOWN.match(path)
    if match:
        side, level, kind, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        position = layers_per_block if kind in ("downsamplers", "upsamplers") else index
        if side == "down":
            return 1 + level * per_level + position
        return FIRST_UP_BLOCK_INDEX + level * per_level + position
    if _MID.match(path):
        return MID_BLOCK_INDEX
    if _CONV_IN.match(path):
        return 0
    return None


_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)[._](\d+)(?:[._]|$)")
_SGM_BASE = re.compile(r"^(time_embed|label_emb)(?:[._]|$)")
_SGM_OUT = re.compile(r"^out(?:[._]|$)")
_SGM_FIRST_BLOCK = {"input_blocks": SDXL_LAYOUT.leading,  # 1
                    "middle_block": SDXL_LAYOUT.leading + SDXL_LAYOUT.num_down,  # 10
                    "output_blocks": SDXL_LAYOUT.leading + SDXL_LAYOUT.num_down + SDXL_LAYOUT.num_mid}  # 13


def sdxl_unet_block_index(module_path: str) -> int | None:
    """The block (0..22, :data:`SDXL_LAYOUT`) of an SGM (original SDXL) U-Net module path, or ``None``.

    ``module_path`` is spelled with dots (``input_blocks.4.1.proj_in``) or underscores as in LoRA
    names (``input_blocks_4_1_proj_in``; a ``lora_unet_`` prefix is ignored). SDXL LoRA names are
    SGM paths, and unlike the diffusers paths of SD 1.x/2.x they carry the block directly:
    ``input_blocks.N`` -> ``1 + N``, ``middle_block.N`` -> ``10 + N``, ``output_blocks.N`` -> ``13 + N``,
    ``time_embed``/``label_emb`` -> 0, ``out`` -> 22 (kohya's numbering).
    """
    path = module_path[len("lora_unet_"):] if module_path.startswith("lora_unet_") else module_path
    match = _SGM_BLOCK.match(path)
    if match:
        return _SGM_FIRST_BLOCK[match.group(1)] + int(match.group(2))
    if _SGM_BASE.match(path):
        return 0
    if _SGM_OUT.match(path):
        return SDXL_LAYOUT.num_blocks - 1
    return None


def unet_layers_per_block(unet: object) -> int | None:
    """``layers_per_block`` from a diffusers U-Net's config (2 when it has none); ``None`` if it differs per level."""
    value = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(set(value)) == 1 else None
    return int(value)


# --- learning-rate weights -------------------------------------------------------------------

def lr_weight_preset(name: str, count: int) -> list[float]:
    """Preset lr weights over ``count`` blocks (``count >= 2``), with an optional ``+<base>`` added.

    With ``t = i / (count - 1)`` running 0..1 from the first block to the last:
    ``sine`` = sin(pi/2 * t) (0 -> 1), ``cosine`` = cos(pi/2 * t) (1 -> 0), ``linear`` = t,
    ``reverse_linear`` = 1 - t, ``zeros`` = 0. ``"linear+0.5"`` adds 0.5 to every weight.
    """
    preset, _, base_text = name.partition("+")
    preset = preset.strip()
    try:
        base = float(base_text) if base_text.strip() else 0.0
    except ValueError:
        raise ValueError(f"lr weight preset {name!r}: the part after '+' must be a number, e.g. {preset}+0.5") from None
    if preset not in LR_WEIGHT_PRESETS:
        raise ValueError(f"unknown lr weight preset {preset!r}; use one of {', '.join(LR_WEIGHT_PRESETS)} "
                         "(optionally +<base>) or a comma-separated list of numbers")
    if count < 2:
        raise ValueError(f"lr weight preset {name!r} needs at least 2 blocks; give a number for a single block")
    weights = []
    for i in range(count):
        t = i / (count - 1)
        value = {"sine": math.sin(math.pi / 2 * t), "cosine": math.cos(math.pi / 2 * t), "linear": t,
                 "reverse_linear": 1.0 - t, "zeros": 0.0}[preset]
        weights.append(value + base)
    return weights


def parse_lr_weights(raw: object, count: int, key: str) -> list[float] | None:
    """``down_lr_weight``-style value -> ``count`` floats, or ``None`` when not given.

    Accepts a preset name (see :func:`lr_weight_preset`), a comma-separated list, a single number
    or a sequence of numbers. Short lists are padded with 1.0 (the blocks keep the plain lr); long
    lists are cut to ``count`` with a warning, as kohya does.
    """
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text and (text[0].isalpha() or text.split("+")[0].strip() in LR_WEIGHT_PRESETS):
            try:
                return lr_weight_preset(text, count)
            except ValueError as e:
                raise ValueError(f"--network_args {key}={raw!r}: {e}") from None
        items: Sequence[object] = [p for p in text.split(",") if p.strip()]
    elif isinstance(raw, (list, tuple)):
        items = raw
    else:
        items = [raw]
    try:
        weights = [float(item) for item in items]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"--network_args {key}={raw!r}: expected {count} comma-separated numbers or a preset "
                         f"({', '.join(LR_WEIGHT_PRESETS)}, optionally +<base>)") from None
    if len(weights) > count:
        logger.warning("--network_args %s has %d values; only the first %d are used", key, len(weights), count)
        weights = weights[:count]
    return weights + [1.0] * (count - len(weights))


# --- block dims --------------------------------------------------------------------------------

def _block_values(kwargs: Mapping[str, object], key: str, kind: type, layout: BlockLayout) -> list | None:
    raw = kwargs.get(key)
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    items = [p for p in raw.split(",") if p.strip()] if isinstance(raw, str) else list(raw)  # type: ignore[arg-type]
    if len(items) != layout.num_blocks:
        other = [o.name for o in KNOWN_LAYOUTS if o != layout and o.num_blocks == len(items)]
        hint = f" ({len(items)} values is the {other[0]} layout; this U-Net is {layout.name})" if other else ""
        raise ValueError(f"--network_args {key} needs {layout.num_blocks} values for {layout.name} "
                         f"({layout.parts}), got {len(items)}{hint}; see docs/lora_options.md")
    values = []
    for item in items:
        try:
            number = float(item)  # type: ignore[arg-type]
            if kind is int and not number.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"--network_args {key}: {item!r} is not {'an integer' if kind is int else 'a number'}") from None
        if number < 0:
            raise ValueError(f"--network_args {key}: values must be >= 0, got {item!r}")
        values.append(kind(number))
    return values


@dataclass(frozen=True)
class BlockOptions:
    """Resolved per-block settings, each a list of ``layout.num_blocks`` (index = block).

    ``dims``/``alphas``: Linear and 1x1 convs; ``conv_dims``/``conv_alphas``: 3x3 convs (``None``:
    no 3x3-conv modules). A rank of 0 means no module. ``lr_weights`` is ``None`` unless a
    ``*_lr_weight`` option was given; blocks whose weight is 0 already have rank 0 everywhere.
    ``layout`` is the numbering the lists follow (see :func:`sd_unet_block_index`,
    :func:`sdxl_unet_block_index`).
    """

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weights: list[float] | None
    layout: BlockLayout = SD_LAYOUT

    def rank_alpha(self, block: int, spatial_conv: bool) -> tuple[int, float]:
        if spatial_conv:
            if self.conv_dims is None or self.conv_alphas is None:
                return 0, 0.0
            return self.conv_dims[block], self.conv_alphas[block]
        return self.dims[block], self.alphas[block]


def parse_lr_weight_options(kwargs: Mapping[str, object], layout: BlockLayout = SD_LAYOUT) -> list[float] | None:
    """One lr weight per block of ``layout`` from ``down/mid/up_lr_weight`` and ``block_lr_zero_threshold``.

    ``None`` when no ``*_lr_weight`` is given. A block whose weight is ``<= block_lr_zero_threshold``
    (default 0) gets weight 0. Blocks no option addresses (SDXL's 0 and 22) keep 1.0.
    """
    down = parse_lr_weights(kwargs.get("down_lr_weight"), layout.num_down, "down_lr_weight")
    mid = parse_lr_weights(kwargs.get("mid_lr_weight"), layout.num_mid, "mid_lr_weight")
    up = parse_lr_weights(kwargs.get("up_lr_weight"), layout.num_up, "up_lr_weight")
    threshold_raw = kwargs.get("block_lr_zero_threshold")
    threshold = 0.0
    if threshold_raw is not None and str(threshold_raw).strip().lower() not in ("", "none"):
        try:
            threshold = float(threshold_raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"--network_args block_lr_zero_threshold={threshold_raw!r}: expected a number, e.g. 0.1") from None
    if down is None and mid is None and up is None:
        if threshold_raw is not None:
            logger.warning("block_lr_zero_threshold has no effect without down_lr_weight, mid_lr_weight or up_lr_weight")
        return None
    weights = layout.lr_weights(down or [1.0] * layout.num_down, mid or [1.0] * layout.num_mid,
                                up or [1.0] * layout.num_up)
    # Blocks at or below the threshold are not trained at all, so they are not created either.
    return [0.0 if w <= threshold else w for w in weights]


def parse_block_options(kwargs: Mapping[str, object], dim: int, alpha: float, conv_dim: int | None,
                        conv_alpha: float | None, layout: BlockLayout = SD_LAYOUT) -> BlockOptions | None:
    """Resolve the block ``--network_args`` against the network-wide settings; ``None`` if none is given.

    ``layout`` is the U-Net's block numbering (:data:`SD_LAYOUT`, :data:`SDXL_LAYOUT`); every list
    must have one value per block of it. Missing lists fall back to the network-wide value for
    every block: ``block_alphas`` to ``alpha``, ``block_dims`` to ``dim``; ``conv_block_dims`` to
    ``conv_dim`` (no 3x3-conv modules when neither is given) and ``conv_block_alphas`` to
    ``conv_alpha`` (1.0 when unset).
    """
    dims = _block_values(kwargs, "block_dims", int, layout)
    alphas = _block_values(kwargs, "block_alphas", float, layout)
    conv_dims = _block_values(kwargs, "conv_block_dims", int, layout)
    conv_alphas = _block_values(kwargs, "conv_block_alphas", float, layout)
    lr_weights = parse_lr_weight_options(kwargs, layout)
    if dims is None and alphas is None and conv_dims is None and conv_alphas is None and lr_weights is None:
        return None
    if alphas is not None and dims is None:
        logger.warning("block_alphas without block_dims: every block keeps --network_dim %d", dim)
    if conv_alphas is not None and conv_dims is None and not conv_dim:
        logger.warning("conv_block_alphas without conv_block_dims or conv_dim has no effect (no 3x3-conv modules)")
    count = layout.num_blocks
    dims = dims or [dim] * count
    alphas = alphas or [alpha] * count
    if conv_dims is None and conv_dim:
        conv_dims = [conv_dim] * count
    if conv_dims is not None:
        conv_alphas = conv_alphas or [conv_alpha if conv_alpha is not None else 1.0] * count
    else:
        conv_alphas = None
    if lr_weights is not None:
        dims = [d if w else 0 for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [d if w else 0 for d, w in zip(conv_dims, lr_weights)]
    return BlockOptions(dims, alphas, conv_dims, conv_alphas, lr_weights, layout)
