"""A tiny FLUX.1 DiT in the real BFL key layout, with deterministic random weights.

Width 64 (2 heads of 32, RoPE axes (4, 14, 14)), 3 double + 4 single blocks (enough for
``--blocks_to_swap 2``, which keeps 2 of each kind on the device), 64 input channels (16 latent
channels packed 2x2, as the real model), T5 width 32 and CLIP pooled width 32: about 760k
parameters. Files are written with the same keys as ``flux1-dev.safetensors`` (optionally
under ``model.diffusion_model.``), so they go through the same loader as real checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from library.demo.tiny_dit import random_dit_state_dict, write_dit_file
from library.families.flux.model import CHECKPOINT_PREFIX, Flux, FluxConfig

TINY_T5_DIM = 32
TINY_CLIP_DIM = 32


def tiny_flux_config(guidance_embed: bool = True) -> FluxConfig:
    """The tiny config; ``guidance_embed=False`` is the schnell-style variant (no ``guidance_in``)."""
    return FluxConfig(in_channels=64, vec_in_dim=TINY_CLIP_DIM, context_in_dim=TINY_T5_DIM, hidden_size=64,
                      mlp_ratio=4.0, num_heads=2, depth=3, depth_single_blocks=4, axes_dim=(4, 14, 14),
                      theta=10000, qkv_bias=True, guidance_embed=guidance_embed)


def random_flux_state_dict(config: FluxConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights for every key of ``Flux(config)``, the same for the same (config, seed).

    The recipe of :func:`library.demo.tiny_dit.random_dit_state_dict`: weight matrices
    N(0, 1/fan_in), small biases, qk-norm scales near 1; nothing is zero (unlike a fresh BFL init
    of the final layer and modulations), so outputs depend on every input.
    """
    return random_dit_state_dict(lambda: Flux(config), seed, norm_suffixes=(".scale",))


def write_tiny_flux_dit(path: str | os.PathLike, *, guidance_embed: bool = True, dtype: torch.dtype = torch.float32,
                        seed: int = 0, prefix: str = "") -> Path:
    """Write the tiny DiT as a safetensors file with BFL keys (``prefix`` e.g. ``"model.diffusion_model."``)."""
    return write_dit_file(path, lambda: random_flux_state_dict(tiny_flux_config(guidance_embed), seed=seed),
                          prefix=prefix, dtype=dtype, allowed_prefixes=("", CHECKPOINT_PREFIX),
                          caller="write_tiny_flux_dit")


@dataclass(frozen=True)
class TinyFluxFiles:
    """The files of a tiny FLUX.1 setup, as a user has them: DiT, AE, CLIP-L, T5 and a tokenizer folder."""

    dit: Path
    ae: Path
    clip_l: Path
    t5xxl: Path
    tokenizer_cache_dir: Path

    def train_args(self) -> list[str]:
        """The model flags of flux_train_network.py for these files."""
        return ["--pretrained_model_name_or_path", str(self.dit), "--ae", str(self.ae), "--clip_l", str(self.clip_l),
                "--t5xxl", str(self.t5xxl), "--tokenizer_cache_dir", str(self.tokenizer_cache_dir)]


def write_tiny_flux_setup(folder: str | os.PathLike, *, guidance_embed: bool = True, seed: int = 0) -> TinyFluxFiles:
    """Write a whole tiny FLUX.1 setup (dev-style with ``guidance_embed``, else schnell-style) into ``folder``.

    The T5 tokenizer is a tiny sentencepiece model trained here (``tokenizers/google_t5-v1_1-xxl``),
    and the tiny T5's vocabulary matches it; CLIP-L uses the real CLIP vocabulary.
    """
    from library.demo.tiny_flux_encoders import write_tiny_ae, write_tiny_clip_l, write_tiny_t5, write_tiny_t5_tokenizer
    from library.families.t5_tokenizer import load_t5_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = "flux1-dev" if guidance_embed else "flux1-schnell"
    dit = write_tiny_flux_dit(folder / f"tiny-{name}.safetensors", guidance_embed=guidance_embed, seed=seed)
    tokenizers = folder / "tokenizers"
    write_tiny_t5_tokenizer(tokenizers, seed=seed)
    vocab = len(load_t5_tokenizer(str(tokenizers)))
    return TinyFluxFiles(
        dit=dit,
        ae=write_tiny_ae(folder / "ae.safetensors", seed=seed),
        clip_l=write_tiny_clip_l(folder / "clip_l.safetensors", seed=seed),
        t5xxl=write_tiny_t5(folder / "t5xxl.safetensors", vocab, seed=seed),
        tokenizer_cache_dir=tokenizers,
    )
