"""Tiny SD3 / SD3.5 text encoders and a whole tiny SD3 checkpoint in SAI's all-in-one layout.

Widths are chosen so the real conditioning layout holds at toy size: CLIP-L hidden + CLIP-G hidden
must fit in the T5 width (``lg_out`` is zero-padded to it), and the MMDiT's pooled input is
CLIP-L projection + CLIP-G projection.

- CLIP-L: width 12 (= projection), 2 layers, 1 head, quick-GELU, the real 49408-token vocabulary
  and 77 positions (the real CLIP tokenizer works); ``text_model.*`` + ``text_projection.weight``.
- CLIP-G: width 16 (= projection), 2 layers, 1 head, exact GELU (OpenCLIP bigG's), same vocabulary.
  L and G differ in width (as 768 vs 1280 do) so a swapped slice shows.
- T5: the tiny FLUX T5 (:mod:`library.demo.tiny_flux_encoders`): d_model 32, gated-GELU, and its
  sentencepiece tokenizer folder.
- VAE: the tiny 16-channel FLUX AE (same architecture as SD3's VAE), LDM names.

So ``lg_out`` is 12 + 16 = 28 channels, padded with 4 zeros to the context width 32 (= T5 width),
and the pooled vector is 28 wide. The MMDiT comes from :mod:`library.demo.tiny_sd3`.

A checkpoint holds ``model.diffusion_model.*`` (MMDiT), ``first_stage_model.*`` (VAE) and, with
``with_text_encoders``, ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*``,
``text_encoders.t5xxl.transformer.*``: the layout of ``sd3_medium_incl_clips_t5xxlfp16.safetensors``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from library.demo.tiny_flux_encoders import T5_WIDTH, build_tiny_ae, build_tiny_t5, write_tiny_t5_tokenizer
from library.demo.tiny_sd import randomize_
from library.families.flux.autoencoder import ae_state_dict_bfl
from library.families.text_encoder_files import clip_state_dict, t5_state_dict

CLIP_L_WIDTH = 12
CLIP_G_WIDTH = 16
#: The tiny MMDiT's context width: the T5 width, which ``lg_out`` (12 + 16) is padded to.
CONTEXT_WIDTH = T5_WIDTH
#: The tiny MMDiT's pooled (``y``) width: CLIP-L projection + CLIP-G projection.
POOLED_WIDTH = CLIP_L_WIDTH + CLIP_G_WIDTH
#: T5 vocabulary of the tiny checkpoint: at least the tiny tokenizer's (451 tokens), as T5-XXL's
#: 32128 rows exceed its tokenizer's 32100.
TINY_T5_VOCAB = 512

#: SAI all-in-one prefixes.
MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

assert CLIP_L_WIDTH + CLIP_G_WIDTH <= CONTEXT_WIDTH  # the layout needs it


def _clip_config(width: int, act: str) -> CLIPTextConfig:
    # One head: the loaders read heads as width // 64 (at least 1), as for the real towers.
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                          num_attention_heads=1, max_position_embeddings=77, hidden_act=act, projection_dim=width)


def tiny_sd3_clip_l_config() -> CLIPTextConfig:
    return _clip_config(CLIP_L_WIDTH, "quick_gelu")


def tiny_clip_g_config() -> CLIPTextConfig:
    return _clip_config(CLIP_G_WIDTH, "gelu")


def build_tiny_sd3_clip_l(seed: int = 0) -> CLIPTextModelWithProjection:
    """The tiny SD3 CLIP-L (with ``text_projection``), deterministic for a seed."""
    return randomize_(CLIPTextModelWithProjection(tiny_sd3_clip_l_config()), seed)


def build_tiny_clip_g(seed: int = 0) -> CLIPTextModelWithProjection:
    """The tiny CLIP-G (with ``text_projection``), deterministic for a seed."""
    return randomize_(CLIPTextModelWithProjection(tiny_clip_g_config()), seed)


def _prefixed(state_dict: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def _save(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    return path


def tiny_sd3_clip_l_state_dict(seed: int = 0, *, prefix: str = "", dtype: torch.dtype = torch.float32
                               ) -> dict[str, torch.Tensor]:
    return _prefixed(clip_state_dict(build_tiny_sd3_clip_l(seed)), prefix, dtype)


def tiny_clip_g_state_dict(seed: int = 0, *, prefix: str = "", dtype: torch.dtype = torch.float32
                           ) -> dict[str, torch.Tensor]:
    return _prefixed(clip_state_dict(build_tiny_clip_g(seed)), prefix, dtype)


def tiny_sd3_t5_state_dict(seed: int = 0, *, vocab_size: int = TINY_T5_VOCAB, prefix: str = "",
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return _prefixed(t5_state_dict(build_tiny_t5(vocab_size, seed)), prefix, dtype)


def tiny_sd3_vae_state_dict(seed: int = 0, *, prefix: str = VAE_PREFIX, dtype: torch.dtype = torch.float32
                            ) -> dict[str, torch.Tensor]:
    """The tiny 16-channel VAE in LDM names (under ``first_stage_model.`` by default)."""
    return _prefixed(ae_state_dict_bfl(build_tiny_ae(seed)), prefix, dtype)


def write_tiny_sd3_clip_l(path: str | os.PathLike, seed: int = 0, *, prefix: str = "",
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny CLIP-L as ``clip_l.safetensors`` (``text_model.*``, ``text_projection.weight``)."""
    return _save(path, tiny_sd3_clip_l_state_dict(seed, prefix=prefix, dtype=dtype))


def write_tiny_clip_g(path: str | os.PathLike, seed: int = 0, *, prefix: str = "",
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny CLIP-G as ``clip_g.safetensors`` (transformers names, ``text_projection.weight``)."""
    return _save(path, tiny_clip_g_state_dict(seed, prefix=prefix, dtype=dtype))


def write_tiny_sd3_t5(path: str | os.PathLike, seed: int = 0, *, vocab_size: int = TINY_T5_VOCAB, prefix: str = "",
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny T5 as ``t5xxl_*.safetensors`` (``shared.weight``, ``encoder.*``)."""
    return _save(path, tiny_sd3_t5_state_dict(seed, vocab_size=vocab_size, prefix=prefix, dtype=dtype))


def write_tiny_sd3_vae(path: str | os.PathLike, seed: int = 0, *, prefix: str = "",
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny VAE as a separate ``--vae`` file (LDM names under ``prefix``)."""
    return _save(path, tiny_sd3_vae_state_dict(seed, prefix=prefix, dtype=dtype))


def tiny_sd3_mmdit_state_dict(variant: str = "sd3_medium", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny MMDiT's tensors (no prefix) for ``variant``, sized for these encoders."""
    from library.demo.tiny_sd3 import random_sd3_state_dict, tiny_sd3_config

    config = tiny_sd3_config(variant, adm_in_channels=POOLED_WIDTH)
    if config.context_in_dim != CONTEXT_WIDTH:  # pragma: no cover - a guard for edits of tiny_sd3
        raise RuntimeError(f"tiny MMDiT context width {config.context_in_dim} != tiny T5 width {CONTEXT_WIDTH}")
    return random_sd3_state_dict(config, seed=seed)


def write_tiny_sd3_checkpoint(path: str | os.PathLike, variant: str = "sd3_medium", *, with_text_encoders: bool = True,
                              with_t5: bool = True, seed: int = 0, t5_vocab_size: int = TINY_T5_VOCAB,
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write ONE tiny SD3 single file in SAI's layout (see the module doc).

    ``variant``: ``"sd3_medium"``, ``"sd35_large"``, ``"sd35_medium"``. ``with_text_encoders=False``
    writes MMDiT + VAE only (as ``sd3_medium.safetensors``); ``with_t5=False`` leaves T5 out of the
    text encoders (as ``sd3_medium_incl_clips.safetensors``). Weights are floats of ``dtype``,
    deterministic for ``seed`` (each part draws from its own generator).
    """
    state_dict = {MMDIT_PREFIX + k: v.to(dtype).contiguous()
                  for k, v in tiny_sd3_mmdit_state_dict(variant, seed).items()}
    state_dict.update(tiny_sd3_vae_state_dict(seed, dtype=dtype))
    if with_text_encoders:
        state_dict.update(tiny_sd3_clip_l_state_dict(seed, prefix=CLIP_L_PREFIX, dtype=dtype))
        state_dict.update(tiny_clip_g_state_dict(seed, prefix=CLIP_G_PREFIX, dtype=dtype))
        if with_t5:
            state_dict.update(tiny_sd3_t5_state_dict(seed, vocab_size=t5_vocab_size, prefix=T5_PREFIX, dtype=dtype))
    return _save(path, state_dict)


@dataclass(frozen=True)
class TinySD3Files:
    """A tiny SD3 setup as a user has it: the single file, the tokenizer folder and, optionally,
    separate encoder / VAE files (None when not written)."""

    checkpoint: Path
    tokenizer_cache_dir: Path
    variant: str
    clip_l: Path | None = None
    clip_g: Path | None = None
    t5xxl: Path | None = None
    vae: Path | None = None

    def train_args(self) -> list[str]:
        """The model flags of sd3_train_network.py for these files."""
        args = ["--pretrained_model_name_or_path", str(self.checkpoint),
                "--tokenizer_cache_dir", str(self.tokenizer_cache_dir)]
        for flag, path in (("--clip_l", self.clip_l), ("--clip_g", self.clip_g), ("--t5xxl", self.t5xxl),
                           ("--vae", self.vae)):
            if path is not None:
                args += [flag, str(path)]
        return args


def write_tiny_sd3_setup(folder: str | os.PathLike, variant: str = "sd3_medium", *, with_text_encoders: bool = True,
                         separate_files: bool = False, seed: int = 0) -> TinySD3Files:
    """Write a tiny SD3 setup into ``folder``: ``tiny-<variant>.safetensors`` (all-in-one when
    ``with_text_encoders``), the T5 tokenizer under ``tokenizers/google_t5-v1_1-xxl`` (CLIP
    tokenizers are built offline by the loaders) and, with ``separate_files``, ``clip_l.safetensors``,
    ``clip_g.safetensors``, ``t5xxl.safetensors`` (the same weights as inside the checkpoint; needed
    when ``with_text_encoders=False``). The T5 vocabulary covers the tokenizer's."""
    from library.families.t5_tokenizer import load_t5_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers = folder / "tokenizers"
    write_tiny_t5_tokenizer(tokenizers, seed=seed)
    if len(load_t5_tokenizer(tokenizers)) > TINY_T5_VOCAB:  # pragma: no cover - a guard for edits
        raise RuntimeError(f"the tiny T5 tokenizer outgrew TINY_T5_VOCAB={TINY_T5_VOCAB}")
    checkpoint = write_tiny_sd3_checkpoint(folder / f"tiny-{variant}.safetensors", variant,
                                           with_text_encoders=with_text_encoders, seed=seed)
    files = TinySD3Files(checkpoint=checkpoint, tokenizer_cache_dir=tokenizers, variant=variant)
    if separate_files:
        files = TinySD3Files(
            checkpoint=checkpoint, tokenizer_cache_dir=tokenizers, variant=variant,
            clip_l=write_tiny_sd3_clip_l(folder / "clip_l.safetensors", seed),
            clip_g=write_tiny_clip_g(folder / "clip_g.safetensors", seed),
            t5xxl=write_tiny_sd3_t5(folder / "t5xxl.safetensors", seed))
    return files


__all__ = [
    "CLIP_G_WIDTH",
    "CLIP_L_WIDTH",
    "CONTEXT_WIDTH",
    "POOLED_WIDTH",
    "TINY_T5_VOCAB",
    "TinySD3Files",
    "build_tiny_clip_g",
    "build_tiny_sd3_clip_l",
    "tiny_clip_g_config",
    "tiny_sd3_clip_l_config",
    "tiny_sd3_mmdit_state_dict",
    "write_tiny_clip_g",
    "write_tiny_sd3_checkpoint",
    "write_tiny_sd3_clip_l",
    "write_tiny_sd3_setup",
    "write_tiny_sd3_t5",
    "write_tiny_sd3_vae",
]
