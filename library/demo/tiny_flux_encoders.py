"""Tiny FLUX.1 autoencoder and text encoders in the real file layouts, deterministic and CPU-fast.

- AE: BFL ``ae.safetensors`` keys (no prefix, LDM names, no quant convs), 4 levels of 32 channels
  (8x downsampling), 2 resnets per level as the real AE, 16 latent channels.
- CLIP-L: ``clip_l.safetensors`` layout (``text_model.*`` + ``text_projection.weight``), width 32,
  2 layers, 1 head (head dim 64 rule: 32 // 64 rounds up to 1), the real 49408-token vocabulary
  and 77 positions so the real CLIP tokenizer works.
- T5: ``t5xxl_fp16.safetensors`` layout (``shared.weight``, ``encoder.*``), d_model 32, 2 layers,
  2 heads of 16, d_ff 64, gated-GELU, 32 relative-attention buckets.
- T5 tokenizer: a small unigram sentencepiece model trained here on a synthetic English corpus
  (pad 0, eos 1, unk 2 as T5's), saved as ``<folder>/google_t5-v1_1-xxl``; give the tiny T5
  ``vocab_size=len(tokenizer)`` (the tokenizer adds T5's 100 ``<extra_id_N>`` tokens).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.demo.tiny_sd import randomize_
from library.families.flux.autoencoder import AE_LATENT_CHANNELS, ae_state_dict_bfl
from library.families.t5_tokenizer import T5_TOKENIZER_ID, cache_folder_name
from library.families.text_encoder_files import clip_state_dict, t5_state_dict

CLIP_WIDTH = 32
T5_WIDTH = 32
TOKENIZER_PIECES = 400


def tiny_ae_config() -> dict:
    """diffusers config of the tiny AE (the real one: (128, 256, 512, 512), same structure)."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (32, 32, 32, 32),
            "layers_per_block": 2, "latent_channels": AE_LATENT_CHANNELS, "norm_num_groups": 32,
            "sample_size": 64, "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": 0.3611, "shift_factor": 0.1159}


def build_tiny_ae(seed: int = 0) -> AutoencoderKL:
    return randomize_(AutoencoderKL(**tiny_ae_config()), seed)


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}


def _save(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    return path


def write_tiny_ae(path: str | os.PathLike, seed: int = 0, *, prefix: str = "",
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny AE as BFL's ``ae.safetensors`` (keys under ``prefix``, floats as ``dtype``)."""
    return _save(path, _cast(ae_state_dict_bfl(build_tiny_ae(seed)), dtype, prefix))


def tiny_clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH,
                          num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=CLIP_WIDTH)


def build_tiny_clip_l(seed: int = 0) -> CLIPTextModelWithProjection:
    """The tiny CLIP-L with its ``text_projection`` (``model.text_model`` is the unprojected tower)."""
    return randomize_(CLIPTextModelWithProjection(tiny_clip_config()), seed)


def write_tiny_clip_l(path: str | os.PathLike, seed: int = 0, *, prefix: str = "",
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny CLIP-L as ``clip_l.safetensors`` (``text_model.*``, ``text_projection.weight``)
    under ``prefix`` (e.g. ``text_encoders.clip_l.transformer.``), floats as ``dtype``."""
    return _save(path, _cast(clip_state_dict(build_tiny_clip_l(seed)), dtype, prefix))


def tiny_t5_config(vocab_size: int) -> T5Config:
    return T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                    use_cache=False, tie_word_embeddings=False)


def build_tiny_t5(vocab_size: int, seed: int = 0) -> T5EncoderModel:
    model = T5EncoderModel(tiny_t5_config(vocab_size))
    # One embedding for both names, as in real T5 files, so both keys hold the same values.
    model.encoder.set_input_embeddings(model.shared)
    return randomize_(model, seed)


def write_tiny_t5(path: str | os.PathLike, vocab_size: int, seed: int = 0, *, prefix: str = "",
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny T5 encoder as ``t5xxl_*.safetensors`` (under ``prefix``, floats as ``dtype``,
    e.g. ``torch.float8_e4m3fn``); ``vocab_size`` should be ``len(tokenizer)``."""
    return _save(path, _cast(t5_state_dict(build_tiny_t5(vocab_size, seed)), dtype, prefix))


# ------------------------------------------------------------------------------------------------
# A tiny T5 sentencepiece tokenizer
# ------------------------------------------------------------------------------------------------

_COLOURS = ("red green blue yellow purple orange pink brown black white grey gray cyan magenta golden silver "
            "dark light bright pale").split()
_SHAPES = ("circle square triangle rectangle star heart hexagon pentagon oval diamond cross ring line dot "
           "spiral cube sphere cone cylinder pyramid").split()
_OBJECTS = ("cat dog bird fish horse tree flower house car boat train plane mountain river lake sky cloud sun "
            "moon city street road forest field garden beach ocean wave rock stone book cup table chair window "
            "door person woman man girl boy child face hand eye hair dress shirt hat").split()
_ADJECTIVES = ("small large big tiny huge round sharp soft smooth rough shiny matte old new young happy sad "
               "beautiful simple detailed colorful empty plain flat wooden metal glass paper").split()
_STYLES = ("photo photograph picture image drawing painting sketch illustration render artwork watercolor "
           "portrait landscape closeup background foreground pattern texture").split()
_FUNCTION = ("a an the of on in at with and or under over above below near next to beside behind between "
             "is are has have this that there here its their very two three four five many some one").split()
_VERBS = ("standing sitting running walking flying swimming holding wearing looking smiling sleeping reading "
          "playing floating falling glowing shining drawn painted made covered filled surrounded lying").split()
_PLACES = ("morning evening night winter summer spring autumn snow rain water fire wood grass leaves corner center "
           "left right top bottom side front back inside outside room kitchen park desert island village castle "
           "bridge tower studio gallery museum market").split()
_TEMPLATES = (
    "a {adj} {obj} {verb} in the {place}",
    "{style} of a {colour} {obj} {verb} {prep} a {shape}, {place}",
    "a {adj} {colour} {shape} on a {colour} background",
    "{style} of a {adj} {obj} {prep} the {obj}",
    "the {colour} {obj} is {prep} a {adj} {shape}",
    "{num} {colour} {shape}s and a {adj} {obj}",
    "A {style} of {num} {adj} {obj}s, {colour} and {colour}.",
    "{obj} with a {colour} {shape}, {style}, {adj}",
)


def caption_corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    """Caption-like English lines that the tiny tokenizers (T5 sentencepiece, Gemma BPE) are trained on."""
    text = []
    for _ in range(lines):
        template = rng.choice(_TEMPLATES)
        text.append(template.format(
            adj=rng.choice(_ADJECTIVES), colour=rng.choice(_COLOURS), shape=rng.choice(_SHAPES),
            obj=rng.choice(_OBJECTS), style=rng.choice(_STYLES), prep=rng.choice(_FUNCTION),
            verb=rng.choice(_VERBS), place=rng.choice(_PLACES),
            num=rng.choice(("two", "three", "four", "5", "12", "many"))))
    # Every letter, digit and common punctuation mark on its own, so rarer words are spelled out
    # from pieces instead of becoming <unk>.
    text.append(" ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    text.append(" ".join(",.;:!?'\"()-_/&%+=#@*"))
    return text


def train_tiny_spiece(seed: int = 0, vocab_size: int = TOKENIZER_PIECES) -> bytes:
    """A unigram sentencepiece model (T5 ids: pad 0, eos 1, unk 2, no bos), deterministic for a seed."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(random.Random(seed))), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def write_tiny_t5_tokenizer(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Train the tiny T5 tokenizer and save it as ``<folder>/google_t5-v1_1-xxl`` (``spiece.model``
    plus what ``save_pretrained`` writes); returns that sub-folder. ``folder`` is what
    ``--tokenizer_cache_dir`` takes."""
    from transformers import T5Tokenizer

    target = Path(folder) / cache_folder_name(T5_TOKENIZER_ID)
    target.mkdir(parents=True, exist_ok=True)
    (target / "spiece.model").write_bytes(train_tiny_spiece(seed))
    T5Tokenizer.from_pretrained(str(target), local_files_only=True).save_pretrained(str(target))
    return target
