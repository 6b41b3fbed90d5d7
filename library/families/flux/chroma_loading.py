"""Loading a Chroma DiT single file (``Chroma1-Base.safetensors``, ``chroma-unlocked-v*.safetensors``).

The file is recognised by its keys (``distilled_guidance_layer.*``; with or without
``model.diffusion_model.``); a FLUX.1 file given with ``--model_type chroma`` (and a Chroma file
given without it, see :mod:`library.families.flux.loading`) is a one-line error naming the fix.
The AE and T5-XXL files are FLUX.1's (:func:`library.families.flux.loading.load_flux_models`
with ``load_dit=load_chroma_dit`` and no CLIP-L).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from library.families.dit_loading import build_dit
from library.families.flux.chroma import CHROMA_MARKER_KEY, Chroma, ChromaConfig, is_chroma_state_dict
from library.families.flux.model import strip_flux_prefix
from library.families.sd.checkpoint.common import CheckpointError
from library.families.sd.loading import read_checkpoint

logger = logging.getLogger(__name__)


def checked_chroma_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The state dict without its prefix, or :class:`CheckpointError` when it is not a Chroma DiT."""
    state_dict = strip_flux_prefix(state_dict)
    if is_chroma_state_dict(state_dict):
        return state_dict
    if "time_in.in_layer.weight" in state_dict and any(k.startswith("double_blocks.") for k in state_dict):
        variant = "dev" if "guidance_in.in_layer.weight" in state_dict else "schnell"
        raise CheckpointError(f"{path}: this is a FLUX.1 {variant} DiT, not Chroma (no {CHROMA_MARKER_KEY}): "
                              "drop --model_type chroma (or use --model_type flux)")
    hint = " It looks like a LoRA: pass it with --network_weights." if any(
        k.startswith(("lora_unet_", "lora_te")) for k in state_dict) else ""
    raise CheckpointError(f"{path}: not a Chroma DiT file (no {CHROMA_MARKER_KEY}).{hint}")


def load_chroma_dit(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", mmap: bool = True) -> Chroma:
    """The DiT of a Chroma single file, config read from its shapes, weights cast to ``dtype``
    (built on ``meta`` and assigned, as :func:`library.families.flux.loading.load_flux_dit`)."""
    path = Path(path)
    state_dict = checked_chroma_state_dict(read_checkpoint(path, mmap=mmap), path)
    try:
        config = ChromaConfig.from_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_dit(lambda: Chroma(config), state_dict, path, name="Chroma DiT", holder="Chroma DiT file",
                      dtype=dtype, device=device, log=logger)
    logger.info("Chroma DiT %s: %d double + %d single blocks, hidden %d, approximator %d x %d, %s", path.name,
                config.depth, config.depth_single_blocks, config.hidden_size, config.approximator_depth,
                config.approximator_hidden_size, dtype)
    return model
