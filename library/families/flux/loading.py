"""Loading a FLUX.1 training setup from the files users have: DiT, AE, CLIP-L, T5-XXL, tokenizers.

``--pretrained_model_name_or_path`` is the DiT single file in the BFL layout (``flux1-dev.safetensors``,
``flux1-schnell.safetensors``, fp32/bf16/fp16/fp8 e4m3fn weights, optionally under
``model.diffusion_model.``); ``--ae``, ``--clip_l`` and ``--t5xxl`` are separate files. Nothing is
downloaded: the CLIP tokenizer is built offline, the T5 tokenizer comes from
``--tokenizer_cache_dir``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from library.families.dit_loading import build_dit
from library.families.flux.model import Flux, FluxConfig, strip_flux_prefix
from library.families.sd.checkpoint.common import CheckpointError
from library.families.sd.loading import read_checkpoint
from library.families.text_encoder_files import other_model_hint

logger = logging.getLogger(__name__)


def _checked_flux_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    from library.families.flux.chroma import CHROMA_MARKER_KEY, is_chroma_state_dict

    state_dict = strip_flux_prefix(state_dict)
    if is_chroma_state_dict(state_dict):
        raise CheckpointError(f"{path}: this is a Chroma model ({CHROMA_MARKER_KEY} is present), not FLUX.1 "
                              "dev/schnell: add --model_type chroma")
    if not any(k.startswith("double_blocks.") for k in state_dict):
        hint = other_model_hint(state_dict)
        if any(k.startswith("transformer_blocks.") for k in state_dict):
            hint = (" It looks like a Diffusers FluxTransformer2DModel; use the original BFL single file "
                    "(flux1-dev.safetensors / flux1-schnell.safetensors).")
        raise CheckpointError(f"{path}: not a FLUX.1 DiT file (no double_blocks.* keys).{hint}")
    return state_dict


def load_flux_dit(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  mmap: bool = True) -> Flux:
    """The DiT of a BFL single file, config read from its shapes, weights cast to ``dtype``.

    fp8 files are upcast to ``dtype`` (training stores them in fp8 again with ``--fp8_base``;
    bf16 holds every e4m3fn value exactly). The model is built on the ``meta`` device and the file's
    tensors are assigned, so a 12B model is never allocated twice.
    """
    path = Path(path)
    state_dict = _checked_flux_state_dict(read_checkpoint(path, mmap=mmap), path)
    config = FluxConfig.from_state_dict(state_dict)
    model = build_dit(lambda: Flux(config), state_dict, path, name="FLUX DiT", holder="FLUX DiT file", dtype=dtype,
                      device=device, log=logger)
    logger.info("FLUX DiT %s: %s, %d double + %d single blocks, hidden %d, %s", path.name,
                "dev (guidance embedding)" if config.guidance_embed else "schnell (no guidance embedding)",
                config.depth, config.depth_single_blocks, config.hidden_size, dtype)
    return model


@dataclass
class FluxModels:
    """Everything a FLUX LoRA run loads (Chroma: ``flux`` is a Chroma DiT, no CLIP-L: ``clip_l`` and
    ``clip_tokenizer`` are None)."""

    flux: Flux
    ae: Any
    clip_l: Any
    t5: Any
    clip_tokenizer: Any
    t5_tokenizer: Any

    @property
    def config(self) -> FluxConfig:
        return self.flux.config


def load_flux_models(dit_path: str, *, ae_path: str, clip_l_path: str | None, t5_path: str,
                     tokenizer_cache_dir: str | None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", mmap: bool = True,
                     load_dit: Callable[..., torch.nn.Module] = load_flux_dit) -> FluxModels:
    """DiT, AE (float32: it runs once per image while caching), CLIP-L, T5-XXL and both tokenizers.

    ``load_dit`` reads the DiT file (Chroma: :func:`library.families.flux.chroma_loading.load_chroma_dit`);
    ``clip_l_path`` None loads no CLIP-L (Chroma has none).
    """
    from library.families.flux.autoencoder import load_flux_ae
    from library.families.sd.tokenizer import load_clip_tokenizer
    from library.families.t5_tokenizer import load_t5_tokenizer
    from library.families.text_encoder_files import load_clip_l, load_t5xxl

    # The tokenizers first: a missing tokenizer folder is found in a second, not after loading the DiT.
    clip_tokenizer = load_clip_tokenizer(v2=False, cache_dir=tokenizer_cache_dir) if clip_l_path else None
    t5_tokenizer = load_t5_tokenizer(tokenizer_cache_dir)
    flux = load_dit(dit_path, dtype=dtype, device=device, mmap=mmap)
    ae = load_flux_ae(ae_path, dtype=torch.float32, device=device, mmap=mmap)
    clip_l = load_clip_l(clip_l_path, dtype=dtype, device=device, mmap=mmap) if clip_l_path else None
    t5 = load_t5xxl(t5_path, dtype=dtype, device=device, mmap=mmap)
    if len(t5_tokenizer) > t5.config.vocab_size:
        raise CheckpointError(f"the T5 tokenizer has {len(t5_tokenizer)} tokens but the --t5xxl model {t5_path} only "
                              f"{t5.config.vocab_size}: the tokenizer folder is not T5-XXL's")
    return FluxModels(flux, ae, clip_l, t5, clip_tokenizer, t5_tokenizer)
