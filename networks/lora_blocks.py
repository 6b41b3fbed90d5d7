"""Per-block LoRA options for the SD 1.x/2.x U-Net: block ranks/alphas and block learning rates.

The options (``--network_args`` of ``networks.lora``) address the U-Net in 25 blocks, numbered as
in the original latent-diffusion (LDM) checkpoint::

    0..11   input_blocks.0 .. input_blocks.11     ("down", 12 values of down_lr_weight)
    12      middle_block                           ("mid", 1 value of mid_lr_weight)
    13..24  output_blocks.0 .. output_blocks.11    ("up", 12 values of up_lr_weight)

Options: ``block_dims``/``block_alphas`` (rank/alpha of Linear and 1x1-conv modules per block),
``conv_block_dims``/``conv_block_alphas`` (rank/alpha of 3x3-conv modules per block), all 25
comma-separated values; ``down_lr_weight``/``mid_lr_weight``/``up_lr_weight`` (lr multipliers per
block, lists or presets) and ``block_lr_zero_threshold``. A rank of 0, or an lr weight that ends
up 0, means the block gets no modules. Module *names* never change, so a file trained with block
options holds a subset of the usual keys and loads anywhere a normal LoRA does.

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
    "BLOCK_OPTION_KEYS", "BlockOptions", "sd_unet_block_index", "lr_weight_preset", "parse_lr_weights",
    "parse_block_options", "parse_lr_weight_options", "unet_layers_per_block",
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

def _block_values(kwargs: Mapping[str, object], key: str, kind: type) -> list | None:
    raw = kwargs.get(key)
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    items = [p for p in raw.split(",") if p.strip()] if isinstance(raw, str) else list(raw)  # type: ignore[arg-type]
    if len(items) != NUM_BLOCKS:
        raise ValueError(f"--network_args {key} needs {NUM_BLOCKS} values for SD 1.x/2.x "
                         f"({NUM_DOWN_BLOCKS} down, 1 mid, {NUM_UP_BLOCKS} up), got {len(items)}")
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
    """Resolved per-block settings, each a list of 25 (index = block, see :func:`sd_unet_block_index`).

    ``dims``/``alphas``: Linear and 1x1 convs; ``conv_dims``/``conv_alphas``: 3x3 convs (``None``:
    no 3x3-conv modules). A rank of 0 means no module. ``lr_weights`` is ``None`` unless a
    ``*_lr_weight`` option was given; blocks whose weight is 0 already have rank 0 everywhere.
    """

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weights: list[float] | None

    def rank_alpha(self, block: int, spatial_conv: bool) -> tuple[int, float]:
        if spatial_conv:
            if self.conv_dims is None or self.conv_alphas is None:
                return 0, 0.0
            return self.conv_dims[block], self.conv_alphas[block]
        return self.dims[block], self.alphas[block]


def parse_lr_weight_options(kwargs: Mapping[str, object]) -> list[float] | None:
    """The 25 lr weights from ``down/mid/up_lr_weight`` and ``block_lr_zero_threshold`` (``None`` if unset).

    A block whose weight is ``<= block_lr_zero_threshold`` (default 0) gets weight 0.
    """
    down = parse_lr_weights(kwargs.get("down_lr_weight"), NUM_DOWN_BLOCKS, "down_lr_weight")
    mid = parse_lr_weights(kwargs.get("mid_lr_weight"), NUM_MID_BLOCKS, "mid_lr_weight")
    up = parse_lr_weights(kwargs.get("up_lr_weight"), NUM_UP_BLOCKS, "up_lr_weight")
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
    weights = (down or [1.0] * NUM_DOWN_BLOCKS) + (mid or [1.0] * NUM_MID_BLOCKS) + (up or [1.0] * NUM_UP_BLOCKS)
    # Blocks at or below the threshold are not trained at all, so they are not created either.
    return [0.0 if w <= threshold else w for w in weights]


def parse_block_options(kwargs: Mapping[str, object], dim: int, alpha: float, conv_dim: int | None,
                        conv_alpha: float | None) -> BlockOptions | None:
    """Resolve the block ``--network_args`` against the network-wide settings; ``None`` if none is given.

    Missing lists fall back to the network-wide value for every block: ``block_alphas`` to
    ``alpha``, ``block_dims`` to ``dim``; ``conv_block_dims`` to ``conv_dim`` (no 3x3-conv modules
    when neither is given) and ``conv_block_alphas`` to ``conv_alpha`` (1.0 when unset).
    """
    dims = _block_values(kwargs, "block_dims", int)
    alphas = _block_values(kwargs, "block_alphas", float)
    conv_dims = _block_values(kwargs, "conv_block_dims", int)
    conv_alphas = _block_values(kwargs, "conv_block_alphas", float)
    lr_weights = parse_lr_weight_options(kwargs)
    if dims is None and alphas is None and conv_dims is None and conv_alphas is None and lr_weights is None:
        return None
    if alphas is not None and dims is None:
        logger.warning("block_alphas without block_dims: every block keeps --network_dim %d", dim)
    if conv_alphas is not None and conv_dims is None and not conv_dim:
        logger.warning("conv_block_alphas without conv_block_dims or conv_dim has no effect (no 3x3-conv modules)")
    dims = dims or [dim] * NUM_BLOCKS
    alphas = alphas or [alpha] * NUM_BLOCKS
    if conv_dims is None and conv_dim:
        conv_dims = [conv_dim] * NUM_BLOCKS
    if conv_dims is not None:
        conv_alphas = conv_alphas or [conv_alpha if conv_alpha is not None else 1.0] * NUM_BLOCKS
    else:
        conv_alphas = None
    if lr_weights is not None:
        dims = [d if w else 0 for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [d if w else 0 for d, w in zip(conv_dims, lr_weights)]
    return BlockOptions(dims, alphas, conv_dims, conv_alphas, lr_weights)
