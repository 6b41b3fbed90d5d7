"""A tiny Chroma DiT in the real checkpoint layout, and a whole tiny Chroma setup (DiT, AE, T5).

The FLUX tiny widths (:mod:`library.demo.tiny_flux`: width 64, 2 heads of 32, 3 double + 4 single
blocks, T5 width 32) with Chroma's approximator at its real input width 64 (16 + 16 + 32 sinusoidal
channels), hidden width 96 and 2 layers: about 500k parameters. Files carry the keys of a released
``Chroma1-Base.safetensors`` (optionally under ``model.diffusion_model.``), so they go through the
same loader as real checkpoints. There is no CLIP-L file: Chroma uses T5 only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from library.demo.tiny_dit import random_dit_state_dict, write_dit_file
from library.demo.tiny_flux import TINY_T5_DIM
from library.families.flux.chroma import Chroma, ChromaConfig
from library.families.flux.model import CHECKPOINT_PREFIX


def tiny_chroma_config() -> ChromaConfig:
    return ChromaConfig(in_channels=64, context_in_dim=TINY_T5_DIM, hidden_size=64, mlp_ratio=4.0, num_heads=2,
                        depth=3, depth_single_blocks=4, axes_dim=(4, 14, 14), theta=10000, qkv_bias=True,
                        approximator_in_dim=64, approximator_hidden_size=96, approximator_depth=2)


def random_chroma_state_dict(config: ChromaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights for every key of ``Chroma(config)``, the same for the same (config, seed)
    (the recipe of :func:`library.demo.tiny_dit.random_dit_state_dict`; RMS-norm ``scale`` near 1)."""
    return random_dit_state_dict(lambda: Chroma(config), seed, norm_suffixes=(".scale",))


def write_tiny_chroma_dit(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                          prefix: str = "") -> Path:
    """Write the tiny Chroma DiT as a safetensors file with Chroma's keys (``prefix`` e.g.
    ``"model.diffusion_model."``)."""
    return write_dit_file(path, lambda: random_chroma_state_dict(tiny_chroma_config(), seed=seed), prefix=prefix,
                          dtype=dtype, allowed_prefixes=("", CHECKPOINT_PREFIX), caller="write_tiny_chroma_dit")


@dataclass(frozen=True)
class TinyChromaFiles:
    """The files of a tiny Chroma setup, as a user has them: DiT, AE, T5 and a tokenizer folder."""

    dit: Path
    ae: Path
    t5xxl: Path
    tokenizer_cache_dir: Path

    def train_args(self) -> list[str]:
        """The model flags of ``flux_train_network.py --model_type chroma`` for these files."""
        return ["--pretrained_model_name_or_path", str(self.dit), "--model_type", "chroma", "--ae", str(self.ae),
                "--t5xxl", str(self.t5xxl), "--tokenizer_cache_dir", str(self.tokenizer_cache_dir)]


def write_tiny_chroma_setup(folder: str | os.PathLike, *, seed: int = 0) -> TinyChromaFiles:
    """Write a tiny Chroma setup into ``folder`` (the AE, T5 and T5 tokenizer of the tiny FLUX setup)."""
    from library.demo.tiny_flux_encoders import write_tiny_ae, write_tiny_t5, write_tiny_t5_tokenizer
    from library.families.t5_tokenizer import load_t5_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers = folder / "tokenizers"
    write_tiny_t5_tokenizer(tokenizers, seed=seed)
    vocab = len(load_t5_tokenizer(str(tokenizers)))
    return TinyChromaFiles(
        dit=write_tiny_chroma_dit(folder / "tiny-chroma.safetensors", seed=seed),
        ae=write_tiny_ae(folder / "ae.safetensors", seed=seed),
        t5xxl=write_tiny_t5(folder / "t5xxl.safetensors", vocab, seed=seed),
        tokenizer_cache_dir=tokenizers,
    )
