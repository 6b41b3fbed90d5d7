"""A tiny Lumina-Image 2.0 setup in the real file layouts, deterministic and CPU-fast.

- DiT: the original single-file keys (``x_embedder``, ``layers.N.attention.qkv``, ...,
  ``norm_final.weight``), width 48 (2 query heads and 1 key/value head of 24: grouped-query
  attention as the real 24/8, RoPE axes (8, 8, 8)), 4 main layers (enough for
  ``--blocks_to_swap 2``) and 2 + 2 refiner layers as the real model, 16 latent channels, captions
  of width 64: about 0.4M parameters.
- Gemma-2: ``Gemma2Model`` keys (``embed_tokens.weight``, ``layers.N...``, ``norm.weight``; the
  ForCausalLM ``model.`` prefix or ComfyUI's ``text_encoders.gemma2_2b.transformer.model.`` on
  request), width 64, 3 layers, 2 query / 1 key-value heads of Gemma-2's head dim 256.
- Tokenizer: a small byte-fallback BPE trained here on a synthetic English corpus with Gemma's
  special ids (pad 0, eos 1, bos 2, unk 3), saved as ``<folder>/google_gemma-2-2b`` in the
  transformers layout (``tokenizer.json``), as a copy of the real one would be.
- AE: the tiny FLUX.1 AE (:func:`library.demo.tiny_flux_encoders.write_tiny_ae`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2Model

from library.demo.tiny_dit import random_dit_state_dict, write_dit_file
from library.demo.tiny_sd import randomize_
from library.families.lumina.gemma import GEMMA2_DEFAULTS
from library.families.lumina.model import CHECKPOINT_PREFIX, LuminaConfig, NextDiT
from library.families.lumina.tokenizer import GEMMA2_TOKENIZER_ID
from library.families.t5_tokenizer import cache_folder_name
from library.io_utils import save_safetensors

TINY_GEMMA_WIDTH = 64
TOKENIZER_MERGES_VOCAB = 500
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "norm_final.weight", "cap_embedder.0.weight")


def tiny_lumina_config(**overrides) -> LuminaConfig:
    values = dict(patch_size=2, in_channels=16, hidden_size=48, num_layers=4, num_noise_refiner_layers=2,
                  num_context_refiner_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=192,
                  cap_feat_dim=TINY_GEMMA_WIDTH, time_embed_dim=48, axes_dim=(8, 8, 8))
    values.update(overrides)
    return LuminaConfig(**values)


def random_lumina_state_dict(config: LuminaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights for every key of ``NextDiT(config)``, the same for the same (config, seed)
    (the recipe of :func:`library.demo.tiny_dit.random_dit_state_dict`: nothing is zero)."""
    return random_dit_state_dict(lambda: NextDiT(config), seed, norm_suffixes=_NORM_SUFFIXES)


def write_tiny_lumina_dit(path: str | os.PathLike, *, config: LuminaConfig | None = None,
                          dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = "") -> Path:
    """Write the tiny DiT with the original keys (``prefix`` e.g. ``"model.diffusion_model."``)."""
    config = config or tiny_lumina_config()
    return write_dit_file(path, lambda: random_lumina_state_dict(config, seed=seed), prefix=prefix, dtype=dtype,
                          allowed_prefixes=("", CHECKPOINT_PREFIX), caller="write_tiny_lumina_dit")


# --- Gemma-2 -----------------------------------------------------------------------------------------

def tiny_gemma2_config(vocab_size: int) -> Gemma2Config:
    return Gemma2Config(vocab_size=vocab_size, hidden_size=TINY_GEMMA_WIDTH, intermediate_size=128,
                        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, **GEMMA2_DEFAULTS)


def build_tiny_gemma2(vocab_size: int, seed: int = 0) -> Gemma2Model:
    return randomize_(Gemma2Model(tiny_gemma2_config(vocab_size)), seed)


def write_tiny_gemma2(path: str | os.PathLike, vocab_size: int, seed: int = 0, *, prefix: str = "",
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny encoder as a single file with ``Gemma2Model`` keys under ``prefix``
    (``"model."``: the ForCausalLM layout; ``"text_encoders.gemma2_2b.transformer.model."``: ComfyUI's)."""
    state_dict = build_tiny_gemma2(vocab_size, seed).state_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({prefix + k: v.to(dtype).contiguous() for k, v in state_dict.items()}, path)
    return path


# --- tokenizer ---------------------------------------------------------------------------------------

def write_tiny_gemma_tokenizer(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Train the tiny Gemma-style tokenizer and save it as ``<folder>/google_gemma-2-2b``; returns that
    sub-folder (``folder`` is what ``--tokenizer_cache_dir`` takes)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    from library.demo.tiny_flux_encoders import caption_corpus

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    # Word-level merges while training only; GemmaTokenizer sets Gemma's own normalizer and splitting.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_MERGES_VOCAB, special_tokens=list(GEMMA_SPECIAL_TOKENS),
                                  show_progress=False)
    bpe.train_from_iterator(caption_corpus(random.Random(seed)), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):  # Gemma's byte fallback pieces: every character can be encoded
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]], add_bos_token=True,
                               add_eos_token=False)
    target = Path(folder) / cache_folder_name(GEMMA2_TOKENIZER_ID)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(target))
    return target


# --- the whole setup ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyLuminaFiles:
    """The files of a tiny Lumina-Image 2.0 setup as a user has them: DiT, Gemma-2, AE and a tokenizer folder."""

    dit: Path
    gemma2: Path
    ae: Path
    tokenizer_cache_dir: Path

    def train_args(self) -> list[str]:
        """The model flags of lumina_train_network.py for these files."""
        return ["--pretrained_model_name_or_path", str(self.dit), "--gemma2", str(self.gemma2), "--ae", str(self.ae),
                "--tokenizer_cache_dir", str(self.tokenizer_cache_dir)]


def write_tiny_lumina_setup(folder: str | os.PathLike, seed: int = 0) -> TinyLuminaFiles:
    """Write a whole tiny setup into ``folder``; the tiny Gemma-2's vocabulary matches the tokenizer."""
    from library.demo.tiny_flux_encoders import write_tiny_ae
    from library.families.lumina.tokenizer import load_gemma_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers = folder / "tokenizers"
    write_tiny_gemma_tokenizer(tokenizers, seed=seed)
    vocab = len(load_gemma_tokenizer(None, tokenizers))
    return TinyLuminaFiles(
        dit=write_tiny_lumina_dit(folder / "tiny-lumina-2.safetensors", seed=seed),
        gemma2=write_tiny_gemma2(folder / "gemma_2_2b.safetensors", vocab, seed=seed),
        ae=write_tiny_ae(folder / "ae.safetensors", seed=seed),
        tokenizer_cache_dir=tokenizers,
    )
