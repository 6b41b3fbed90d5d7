"""Loading an SD3 / SD3.5 training setup: MMDiT, VAE, CLIP-L, CLIP-G, T5-XXL and their tokenizers.

``--pretrained_model_name_or_path`` is SAI's single ``.safetensors`` file:

==========================================  =====================================================
``model.diffusion_model.*``                 the MMDiT (SAI layout, :mod:`library.families.sd3.model`)
``first_stage_model.*``                     the 16-channel VAE (LDM names)
``text_encoders.clip_l.transformer.*``      CLIP-L, transformers names (all-in-one files only)
``text_encoders.clip_g.transformer.*``      CLIP-G, transformers names (all-in-one files only)
``text_encoders.t5xxl.transformer.*``       T5-XXL (``..._incl_clips_t5xxlfp16/fp8`` files only)
==========================================  =====================================================

``--clip_l`` / ``--clip_g`` / ``--t5xxl`` / ``--vae`` files replace the file's own. CLIP-L and
CLIP-G are required (from the file or the flag); T5 may be absent altogether (no ``--t5xxl`` and
none in the file): it is then None and the conditioning uses zeros in its place, as the reference
does. Nothing is downloaded: the CLIP tokenizers are built offline (or read from
``--tokenizer_cache_dir``), the T5 tokenizer comes from ``--tokenizer_cache_dir``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from library.families.dit_loading import build_dit
from library.families.sd.checkpoint.common import CheckpointError
from library.families.sd.loading import read_checkpoint
from library.families.sd3.model import CHECKPOINT_PREFIX, SD3Config, SD3MMDiT, strip_sd3_prefix
from library.families.sd3.vae import has_sd3_vae, load_sd3_vae
from library.families.text_encoder_files import other_model_hint

logger = logging.getLogger(__name__)

SD3_VARIANTS = ("sd3_medium", "sd35_large", "sd35_medium")
#: SAI all-in-one prefixes of the text encoders.
CLIP_L_FILE_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_FILE_PREFIX = "text_encoders.clip_g.transformer."
T5_FILE_PREFIX = "text_encoders.t5xxl.transformer."

_MODEL_FLAG = "--pretrained_model_name_or_path"


@dataclass
class SD3Models:
    """Everything an SD3 run loads. ``t5`` (and ``t5_tokenizer`` when its folder is absent too) is
    None when the setup has no T5; ``variant`` is one of :data:`SD3_VARIANTS`."""

    mmdit: SD3MMDiT
    vae: Any
    clip_l: CLIPTextModelWithProjection
    clip_g: CLIPTextModelWithProjection
    t5: T5EncoderModel | None
    clip_l_tokenizer: CLIPTokenizer
    clip_g_tokenizer: CLIPTokenizer
    t5_tokenizer: PreTrainedTokenizerBase | None
    variant: str
    #: CLIP-L's width: where CLIP-G's channels start in ``lg_out`` / ``lg_pooled`` (give it to
    #: ``sd3.text.from_cache``; kept here so it survives freeing the encoders after caching).
    clip_l_width: int = 768
    #: The MMDiT's context width (4096: T5-XXL's): ``t5_width`` of ``sd3.text.encode`` without T5.
    context_width: int = 4096

    @property
    def config(self) -> SD3Config:
        return self.mmdit.config


def sd3_variant(config: SD3Config) -> str:
    """``"sd3_medium"`` (no qk-norm), ``"sd35_large"`` (qk-norm), ``"sd35_medium"`` (qk-norm and
    MMDiT-X ``attn2`` layers), read from the config (hence from the weights)."""
    if config.qk_norm is None:
        return "sd3_medium"
    return "sd35_medium" if config.x_block_self_attn_layers else "sd35_large"


# ------------------------------------------------------------------------------------------------
# What the file is
# ------------------------------------------------------------------------------------------------

def _has_prefix(keys: Collection[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def check_sd3_state_dict(state_dict: Mapping[str, torch.Tensor], path: object) -> None:
    """Raise :class:`CheckpointError` (what the file is, which script or flag fits) unless
    ``state_dict`` holds an SD3 MMDiT in the SAI layout (with or without ``model.diffusion_model.``)."""
    keys = list(state_dict)
    if _has_prefix(keys, CHECKPOINT_PREFIX + "joint_blocks.") or _has_prefix(keys, "joint_blocks."):
        return
    hint = other_model_hint(state_dict)
    if _has_prefix(keys, "transformer_blocks.") and "context_embedder.weight" in state_dict:
        hint = (" It looks like a Diffusers SD3Transformer2DModel: use SAI's single file (sd3_medium*.safetensors, "
                "sd3.5_*.safetensors).")
    raise CheckpointError(f"{path}: not an SD3/SD3.5 model file (no {CHECKPOINT_PREFIX}joint_blocks.* keys).{hint}")


def load_sd3_mmdit(state_dict: Mapping[str, torch.Tensor], path: object = "SD3 model", *,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SD3MMDiT:
    """The MMDiT of an SD3 state dict (keys with or without ``model.diffusion_model.``), config read
    from its shapes (:meth:`SD3Config.from_state_dict`), built on the meta device and the file's
    tensors assigned (cast to ``dtype``), so the weights are never allocated twice. fp8 files are
    upcast to ``dtype``."""
    check_sd3_state_dict(state_dict, path)
    mmdit_sd = strip_sd3_prefix(state_dict)
    try:
        config = SD3Config.from_state_dict(mmdit_sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    model = build_dit(lambda: SD3MMDiT(config), mmdit_sd, path, name="SD3 MMDiT", dtype=dtype, device=device,
                      log=logger)
    logger.info("SD3 MMDiT %s: %s, %d joint blocks, hidden %d, %d heads, %s", path, sd3_variant(config), config.depth,
                config.hidden_size, config.num_heads, dtype)
    return model


# ------------------------------------------------------------------------------------------------
# The whole setup
# ------------------------------------------------------------------------------------------------

def _encoder_source(own: str | os.PathLike | None, path: Path, keys: Collection[str], prefix: str, flag: str,
                    what: str, *, required: bool) -> Path | None:
    """The file an encoder comes from: the flag's when given, else the model file when it holds the
    encoder under ``prefix``, else None (or a one-line error naming the flag when ``required``)."""
    if own is not None:
        return Path(own)
    if _has_prefix(keys, prefix):
        return path
    if required:
        raise CheckpointError(f"{path} holds no {what} ({prefix}* keys; SAI's files without '_incl_clips' have "
                              f"none): give it with {flag}")
    return None


def load_sd3_models(path: str | os.PathLike, *, clip_l_path: str | os.PathLike | None = None,
                    clip_g_path: str | os.PathLike | None = None, t5_path: str | os.PathLike | None = None,
                    vae_path: str | os.PathLike | None = None, tokenizer_cache_dir: str | os.PathLike | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    mmap: bool = True) -> SD3Models:
    """Load an SD3 / SD3.5 setup (see the module doc) with the MMDiT and text encoders in ``dtype``
    and the VAE in float32 (it runs once per image while caching), all on ``device``.

    ``mmap=False`` reads safetensors files in one sequential read (``--disable_mmap_load_safetensors``).
    The single file is read once for the MMDiT and VAE and released before the text encoders are
    read (from it or their own files), so it is never held twice.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` (one line: what,
    where, which flag or script fits) for a FLUX/SDXL/SD/LoRA file, a missing CLIP-L/CLIP-G/VAE, or
    encoders whose widths do not fit the MMDiT.
    """
    from library.families.sd.tokenizer import SDXL_TOKENIZER2_ID, load_clip_tokenizer
    from library.families.t5_tokenizer import load_t5_tokenizer
    from library.families.text_encoder_files import load_clip_g, load_t5xxl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SD3 model not found: {path} ({_MODEL_FLAG} must be a local .safetensors file; "
                                f"nothing is downloaded)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: {_MODEL_FLAG} takes SAI's single SD3/SD3.5 .safetensors file "
                              f"(Diffusers folders are not supported for SD3)")

    state_dict = read_checkpoint(path, mmap=mmap)
    mmdit = load_sd3_mmdit(state_dict, path, dtype=dtype, device=device)
    if vae_path is not None:
        vae = load_sd3_vae(vae_path, dtype=torch.float32, device=device, mmap=mmap)
    elif has_sd3_vae(state_dict):
        vae = load_sd3_vae(state_dict, name=path, dtype=torch.float32, device=device, flag=_MODEL_FLAG)
    else:
        raise CheckpointError(f"{path} holds no VAE (first_stage_model.* keys): give one with --vae")
    keys = set(state_dict)
    del state_dict  # before the encoders read their files (possibly this one again)

    clip_l_src = _encoder_source(clip_l_path, path, keys, CLIP_L_FILE_PREFIX, "--clip_l", "CLIP-L", required=True)
    clip_g_src = _encoder_source(clip_g_path, path, keys, CLIP_G_FILE_PREFIX, "--clip_g", "CLIP-G", required=True)
    t5_src = _encoder_source(t5_path, path, keys, T5_FILE_PREFIX, "--t5xxl", "T5-XXL", required=False)
    clip_l = _load_clip_l(clip_l_src, keys if clip_l_src == path else None, dtype=dtype, device=device, mmap=mmap)
    clip_g = load_clip_g(clip_g_src, dtype=dtype, device=device, mmap=mmap, with_projection=True)
    t5 = load_t5xxl(t5_src, dtype=dtype, device=device, mmap=mmap) if t5_src is not None else None
    if t5 is None:
        logger.warning("%s has no T5-XXL and --t5xxl was not given: training without T5 (its part of the context is "
                       "zeros)", path)
    _check_widths(mmdit.config, clip_l, clip_g, t5, path, (clip_l_src, clip_g_src, t5_src))

    clip_l_tokenizer = load_clip_tokenizer(v2=False, cache_dir=tokenizer_cache_dir)
    # CLIP-G pads with "!" (id 0): the SD2 / SDXL-bigG tokenizer, under its own hub id.
    clip_g_tokenizer = load_clip_tokenizer(v2=True, cache_dir=tokenizer_cache_dir, repo_id=SDXL_TOKENIZER2_ID)
    if clip_g_tokenizer.pad_token != "!":
        # A cached folder saved with another pad token: SD3's CLIP-G pads with id 0 whatever the folder says.
        logger.info("CLIP-G tokenizer pads with %r; using '!' (id 0) as SD3 does", clip_g_tokenizer.pad_token)
        clip_g_tokenizer.pad_token = "!"
    t5_tokenizer = _t5_tokenizer(tokenizer_cache_dir, t5, t5_src, load_t5_tokenizer)
    return SD3Models(mmdit=mmdit, vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5, clip_l_tokenizer=clip_l_tokenizer,
                     clip_g_tokenizer=clip_g_tokenizer, t5_tokenizer=t5_tokenizer, variant=sd3_variant(mmdit.config),
                     clip_l_width=clip_l.config.hidden_size, context_width=mmdit.config.context_in_dim)


def _file_keys(path: Path) -> set[str] | None:
    """A safetensors file's keys (header only), or None for other sources (folders, pickles)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError):
        return None  # the loader reports the unreadable file


def _load_clip_l(src: Path, keys: set[str] | None, *, dtype: torch.dtype, device: str | torch.device,
                 mmap: bool) -> CLIPTextModelWithProjection:
    """CLIP-L with its projection. A file without ``text_projection.weight`` gets the identity
    projection (SAI's reference code initialises CLIP-L's projection to the identity too), with a
    warning; CLIP-L's hidden and projection widths are equal."""
    from accelerate import init_empty_weights

    from library.families.text_encoder_files import find_prefixes, load_clip_l

    keys = keys if keys is not None else _file_keys(src)
    if keys is not None:
        prefixes = find_prefixes(keys, "embeddings.token_embedding.weight")
        chosen = [p for p in prefixes if "clip_l" in p] if len(prefixes) > 1 else prefixes
        if len(chosen) == 1 and chosen[0].removesuffix("text_model.") + "text_projection.weight" not in keys:
            plain = load_clip_l(src, dtype=dtype, device=device, mmap=mmap, with_projection=False)
            logger.warning("%s: CLIP-L has no text_projection.weight; using the identity projection", src)
            config = plain.config
            config.projection_dim = config.hidden_size
            with init_empty_weights(include_buffers=False):
                model = CLIPTextModelWithProjection(config)
            tensors = {(k if k.startswith("text_model.") else "text_model." + k): v
                       for k, v in plain.state_dict().items()}
            tensors["text_projection.weight"] = torch.eye(config.hidden_size, dtype=dtype, device=device)
            result = model.load_state_dict(tensors, strict=False, assign=True)
            if result.missing_keys or result.unexpected_keys:  # pragma: no cover - a transformers change
                raise CheckpointError(f"{src}: CLIP-L without projection does not map onto "
                                      f"CLIPTextModelWithProjection (missing {result.missing_keys[:3]}, "
                                      f"unexpected {result.unexpected_keys[:3]})")
            return model.to(device).eval()
    return load_clip_l(src, dtype=dtype, device=device, mmap=mmap, with_projection=True)


def _t5_tokenizer(cache_dir, t5: T5EncoderModel | None, t5_src: Path | None, load) -> PreTrainedTokenizerBase | None:
    """The T5 tokenizer; required with a T5 model (and no larger than its vocabulary), optional
    without one (then None when the folder is absent: only the sequence length matters)."""
    if t5 is None:
        try:
            return load(cache_dir)
        except FileNotFoundError:
            logger.info("no T5 tokenizer either; the zero T5 context keeps --t5xxl_max_token_length tokens")
            return None
    tokenizer = load(cache_dir)
    if len(tokenizer) > t5.config.vocab_size:
        raise CheckpointError(f"the T5 tokenizer has {len(tokenizer)} tokens but the T5 model in {t5_src} only "
                              f"{t5.config.vocab_size}: the tokenizer folder is not T5-XXL's")
    return tokenizer


def _check_widths(config: SD3Config, clip_l: Any, clip_g: Any, t5: Any, path: Path,
                  sources: tuple[Path | None, Path | None, Path | None]) -> None:
    """The encoders must fit the MMDiT: T5 width = context width, CLIP-L + CLIP-G hidden widths
    within it (zero-padded), CLIP-L + CLIP-G projections = the pooled width."""
    l_src, g_src, t5_src = sources
    lg = clip_l.config.hidden_size + clip_g.config.hidden_size
    pooled = clip_l.config.projection_dim + clip_g.config.projection_dim
    problems = []
    if t5 is not None and t5.config.d_model != config.context_in_dim:
        problems.append(f"T5 ({t5_src}) is {t5.config.d_model} wide, the MMDiT context {config.context_in_dim}")
    if lg > config.context_in_dim:
        problems.append(f"CLIP-L + CLIP-G ({l_src}, {g_src}) are {lg} wide, more than the context "
                        f"{config.context_in_dim}")
    if pooled != config.adm_in_channels:
        problems.append(f"CLIP-L + CLIP-G projections ({l_src}, {g_src}) give {pooled}, the MMDiT's pooled input "
                        f"(y_embedder) takes {config.adm_in_channels}")
    if problems:
        raise CheckpointError(f"{path}: the text encoders do not fit this SD3 model: {'; '.join(problems)} "
                              f"(check --clip_l / --clip_g / --t5xxl)")


__all__ = [
    "SD3Models",
    "SD3_VARIANTS",
    "check_sd3_state_dict",
    "load_sd3_mmdit",
    "load_sd3_models",
    "sd3_variant",
]
