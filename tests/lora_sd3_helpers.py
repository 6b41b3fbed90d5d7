"""Shared constants, tiny models and helpers of the ``networks.lora_sd3`` tests
(``test_lora_sd3.py``, ``test_lora_sd3_split_qkv.py``)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.demo.tiny_flux_encoders import build_tiny_t5
from library.demo.tiny_sd3 import random_sd3_state_dict, tiny_sd3_config
from library.demo.tiny_sd3_encoders import build_tiny_clip_g, build_tiny_sd3_clip_l
from library.families.sd3.model import SD3Config, SD3MMDiT
from networks import lora_sd3
from networks.lora_dit import SplitLoRAModule
from networks.lora_modules import LoRAModule
from networks.lora_sd3 import create_network, create_network_from_weights
from tests.reference import load_reference


torch.set_num_threads(1)

DIM, ALPHA = 4, 2.0
T5_VOCAB = 64
HIDDEN = tiny_sd3_config().hidden_size
DEPTH = tiny_sd3_config().depth  # 4; the last context block is pre-only
LAST = DEPTH - 1
MMDIT_X_BLOCKS = tiny_sd3_config("sd35_medium").x_block_self_attn_layers  # (0, 1): blocks with attn2

#: the Linear layers of a full joint block, by path inside it, and the per-type rank key of each
BLOCK_LAYERS = {
    "context_block.attn.qkv": "context_attn_dim", "context_block.attn.proj": "context_attn_dim",
    "context_block.mlp.fc1": "context_mlp_dim", "context_block.mlp.fc2": "context_mlp_dim",
    "context_block.adaLN_modulation.1": "context_mod_dim",
    "x_block.attn.qkv": "x_attn_dim", "x_block.attn.proj": "x_attn_dim",
    "x_block.mlp.fc1": "x_mlp_dim", "x_block.mlp.fc2": "x_mlp_dim", "x_block.adaLN_modulation.1": "x_mod_dim",
}
ATTN2_LAYERS = {"x_block.attn2.qkv": "x_attn_dim", "x_block.attn2.proj": "x_attn_dim"}
PRE_ONLY_CONTEXT = ("context_block.attn.qkv", "context_block.adaLN_modulation.1")

EMB_NAMES = {
    "lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0", "lora_unet_t_embedder_mlp_2",
    "lora_unet_x_embedder_proj", "lora_unet_y_embedder_mlp_0", "lora_unet_y_embedder_mlp_2",
    "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear",
}


# --- helpers ---------------------------------------------------------------------------------

def _tiny_mmdit(variant: str = "sd3_medium", seed: int = 0) -> SD3MMDiT:
    config = tiny_sd3_config(variant)
    model = SD3MMDiT(config)
    model.load_state_dict(random_sd3_state_dict(config, seed=seed))
    return model.eval()


def _tiny_encoders(seed: int = 0) -> list:
    """``[CLIP-L, CLIP-G, T5]`` as the SD3 trainer passes them."""
    return [build_tiny_sd3_clip_l(seed).eval(), build_tiny_clip_g(seed + 1).eval(),
            build_tiny_t5(T5_VOCAB, seed + 2).eval()]


def _inputs(config: SD3Config, batch: int = 2, size: int = 8, n_ctx: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, config.in_channels, size, size, generator=g),
                timesteps=torch.rand(batch, generator=g) * 1000,
                context=torch.randn(batch, n_ctx, config.context_in_dim, generator=g),
                y=torch.randn(batch, config.adm_in_channels, generator=g))


def _randomize_up(network, seed: int = 1, std: float = 0.05, only: str | None = None) -> None:
    """Give ``lora_up`` random values (block-diagonal for split modules), so the LoRA does something.

    ``only``: randomize just that module (the others keep their zero ups).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            if only is not None and lora.lora_name != only:
                continue
            value = torch.randn(lora.lora_up.weight.shape, generator=g) * std
            if isinstance(lora, SplitLoRAModule):
                value = value * lora.up_mask
            lora.lora_up.weight.copy_(value)


def _shapes(network) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in network.state_dict().items()}


def _names(network) -> set[str]:
    return {lora.lora_name for lora in network.loras}


def _ranks(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.loras}


def _lora(index: int, path: str) -> str:
    return f"lora_unet_joint_blocks_{index}_{path.replace('.', '_')}"


def _expected_block_layers(variant: str, index: int) -> dict[str, str]:
    """``{path inside joint block index: rank key}`` of a tiny MMDiT of ``variant``."""
    layers = dict(BLOCK_LAYERS)
    if index == LAST:  # pre-only context stream: q/k/v and its modulation only
        layers = {p: k for p, k in layers.items() if not p.startswith("context_block.") or p in PRE_ONLY_CONTEXT}
    if variant == "sd35_medium" and index in MMDIT_X_BLOCKS:
        layers.update(ATTN2_LAYERS)
    return layers


def _block_indices(network) -> set[int]:
    prefix = "lora_unet_joint_blocks_"
    return {int(n[len(prefix):].split("_")[0]) for n in _names(network) if n.startswith(prefix)}

# what the test modules take with ``import *`` (the helpers' leading underscores included)
__all__ = [
    'DIM', 'ALPHA', 'pytest', 'torch', 'logging', 'CLIPTextConfig', 'CLIPTextModelWithProjection', 'T5Config',
    'T5EncoderModel', 'build_tiny_t5', 'random_sd3_state_dict', 'tiny_sd3_config', 'build_tiny_clip_g',
    'build_tiny_sd3_clip_l', 'SD3Config', 'SD3MMDiT', 'lora_sd3', 'SplitLoRAModule', 'LoRAModule',
    'create_network', 'create_network_from_weights', 'load_reference', 'T5_VOCAB', 'HIDDEN', 'DEPTH', 'LAST',
    'MMDIT_X_BLOCKS', 'BLOCK_LAYERS', 'ATTN2_LAYERS', 'PRE_ONLY_CONTEXT', 'EMB_NAMES', '_tiny_mmdit',
    '_tiny_encoders', '_inputs', '_randomize_up', '_shapes', '_names', '_ranks', '_lora',
    '_expected_block_layers', '_block_indices',
]
