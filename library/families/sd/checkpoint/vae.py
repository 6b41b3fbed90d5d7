"""SD 1.x/2.x VAE: LDM (``first_stage_model.*``) <-> diffusers ``AutoencoderKL`` key map and the
:class:`VAEShape` read from a checkpoint or a diffusers state dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .common import (
    _WEIGHT_BIAS,
    VAE_PREFIX,
    CheckpointError,
    Converted,
    Parts,
    StateDict,
    _indices,
    _Module,
    _refuse_unplaced,
    _rename,
    _require,
    _same,
    _strip,
)

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
