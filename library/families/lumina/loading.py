"""Loading a Lumina-Image 2.0 training setup from the files users have: DiT, Gemma-2, AE, tokenizer.

``--pretrained_model_name_or_path`` is the NextDiT single file in the original layout
(``lumina_2_model_bf16.safetensors``; fp32/bf16/fp16/fp8 weights; also under
``model.diffusion_model.`` as ComfyUI / Neta-Lumina all-in-one files store it); ``--gemma2`` the
text encoder (:mod:`library.families.lumina.gemma`), ``--ae`` the FLUX.1 autoencoder
(:func:`library.families.flux.autoencoder.load_flux_ae`; its ``vae.`` prefix too). Nothing is
downloaded; the tokenizer comes from :mod:`library.families.lumina.tokenizer`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.families.dit_loading import build_dit
from library.families.lumina.model import LuminaConfig, NextDiT, strip_lumina_prefix
from library.families.sd.checkpoint.common import CheckpointError
from library.families.sd.loading import read_checkpoint
from library.families.text_encoder_files import other_model_hint

logger = logging.getLogger(__name__)

_ANCHOR = "cap_embedder.1.weight"


def checked_lumina_state_dict(state_dict: dict[str, torch.Tensor], path: object) -> dict[str, torch.Tensor]:
    """The NextDiT tensors of a file's state dict, or a one-line :class:`CheckpointError` saying what the file is."""
    state_dict = strip_lumina_prefix(state_dict)
    if _ANCHOR in state_dict and any(k.startswith("layers.") for k in state_dict):
        return state_dict
    hint = other_model_hint(state_dict)
    if any(k.startswith("time_caption_embed.") for k in state_dict):
        hint = (" It looks like a Diffusers Lumina2Transformer2DModel; use the original single file "
                "(lumina_2_model_bf16.safetensors).")
    raise CheckpointError(f"{path}: not a Lumina-Image 2.0 DiT file (no {_ANCHOR} / layers.* keys).{hint}")


def load_lumina_dit(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    mmap: bool = True) -> NextDiT:
    """The NextDiT of a single file, config read from its shapes, weights cast to ``dtype``
    (built on ``meta`` with the file's tensors assigned: never allocated twice)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--pretrained_model_name_or_path {path}: no such file (the Lumina DiT single file)")
    state_dict = checked_lumina_state_dict(read_checkpoint(path, mmap=mmap), path)
    try:
        config = LuminaConfig.from_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_dit(lambda: NextDiT(config), state_dict, path, name="Lumina DiT", holder="Lumina DiT file",
                      dtype=dtype, device=device, log=logger)
    logger.info("Lumina DiT %s: %d layers + %d/%d refiners, hidden %d, %d/%d heads, %s", path.name, config.num_layers,
                config.num_context_refiner_layers, config.num_noise_refiner_layers, config.hidden_size,
                config.num_heads, config.num_kv_heads, dtype)
    return model


@dataclass
class LuminaModels:
    """Everything a Lumina LoRA run loads."""

    dit: NextDiT
    gemma2: Any
    ae: Any
    tokenizer: Any

    @property
    def config(self) -> LuminaConfig:
        return self.dit.config


def load_lumina_models(dit_path: str, *, gemma2_path: str, ae_path: str, tokenizer_cache_dir: str | None,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       mmap: bool = True) -> LuminaModels:
    """DiT, Gemma-2 and the tokenizer in ``dtype``, the AE in float32 (it runs once per image while caching)."""
    from library.families.flux.autoencoder import load_flux_ae
    from library.families.lumina.gemma import load_gemma2
    from library.families.lumina.tokenizer import load_gemma_tokenizer

    dit = load_lumina_dit(dit_path, dtype=dtype, device=device, mmap=mmap)
    gemma2 = load_gemma2(gemma2_path, dtype=dtype, device=device, mmap=mmap)
    if gemma2.config.hidden_size != dit.config.cap_feat_dim:
        raise CheckpointError(f"--gemma2 {gemma2_path} has width {gemma2.config.hidden_size} but the DiT {dit_path} "
                              f"takes captions of width {dit.config.cap_feat_dim}: give the Gemma-2 model the DiT was "
                              "trained with (gemma-2-2b for Lumina-Image 2.0)")
    tokenizer = load_gemma_tokenizer(gemma2_path, tokenizer_cache_dir)
    if len(tokenizer) > gemma2.config.vocab_size:
        raise CheckpointError(f"the Gemma tokenizer has {len(tokenizer)} tokens but the --gemma2 model {gemma2_path} "
                              f"only {gemma2.config.vocab_size}: the tokenizer folder is not this model's")
    ae = load_flux_ae(ae_path, dtype=torch.float32, device=device, mmap=mmap)
    return LuminaModels(dit, gemma2, ae, tokenizer)
