"""Explaining why a LoRA file does not fit a model.

A user who loads an SDXL LoRA on SD 1.5, or a LyCORIS file with the plain LoRA module, should be
told what the file looks like, not just which key failed. :func:`guess_lora_kind` reads only key
names and a few shapes, so it works on any state dict.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["guess_lora_kind", "format_key_list"]


def format_key_list(keys: Sequence[str], limit: int = 5) -> str:
    """``a, b, c (and 12 more)`` for error messages."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (and {len(keys) - limit} more)"


_SDXL_CONTEXT_WIDTH = 2048  # CLIP-L 768 + bigG 1280, concatenated


def _sd_version_from_dims(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SD 1.x vs 2.x from the cross-attention context width or the text-encoder width."""
    width = _context_width(state_dict)
    if width is not None:
        return {768: "an SD 1.x", 1024: "an SD 2.x"}.get(width, f"an SD-style (context width {width})")
    for key, value in state_dict.items():
        if key.startswith("lora_te_") and key.endswith("mlp_fc1.lora_down.weight") and value.dim() >= 2:
            width = value.shape[1]
            return {768: "an SD 1.x", 1024: "an SD 2.x"}.get(width, f"an SD-style (text width {width})")
    return "an SD 1.x/2.x"


def _context_width(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Width of the cross-attention context (``attn2.to_k`` input), or ``None`` without such a key."""
    for key, value in state_dict.items():
        if key.endswith("attn2_to_k.lora_down.weight") and value.dim() >= 2:
            return int(value.shape[1])
    return None


def guess_lora_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short phrase saying what kind of network/model the weights seem to be for.

    Examples: ``"an SDXL LoRA"``, ``"an SDXL LoRA with diffusers module names (...)"``,
    ``"an SD 2.x LoRA"``, ``"a LyCORIS (LoHa/LoKr) network; load
    it with --network_module lycoris.kohya"``.
    """
    keys = list(state_dict.keys())

    def any_key(*fragments: str) -> bool:
        return any(fragment in key for key in keys for fragment in fragments)

    if any_key(".hada_", ".lokr_", ".dora_scale", ".lora_mid."):
        return "a LyCORIS network (LoHa/LoKr/DoRA/LoCon); load it with the module it was trained with (--network_module lycoris.kohya)"
    if any_key(".oft_blocks"):
        return "an OFT network; load it with --network_module networks.oft"
    if any_key("lora_A.", "lora_B.", ".lora.down.", ".lora_linear_layer.") or any(
        key.startswith(("unet.", "transformer.", "text_encoder.")) for key in keys
    ):
        return "a diffusers/PEFT-format LoRA; convert it to the kohya format (lora_unet_/lora_te_ keys) first"
    if any_key("lora_unet_double_blocks_", "lora_unet_single_blocks_"):
        return "a FLUX.1 LoRA"
    if any_key("lora_unet_joint_blocks_"):
        return "an SD3/SD3.5 LoRA"
    if any_key("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"):
        return "an SDXL LoRA"
    diffusers_unet = any_key("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")
    if diffusers_unet and (any_key("lora_te1_", "lora_te2_") or _context_width(state_dict) == _SDXL_CONTEXT_WIDTH):
        return "an SDXL LoRA with diffusers module names (lora_unet_down_blocks_...)"
    if any_key("lora_te1_", "lora_te2_"):
        return "an SDXL LoRA"
    if diffusers_unet or any_key("lora_te_"):
        return f"{_sd_version_from_dims(state_dict)} LoRA"
    return "a network with an unrecognised key layout"
