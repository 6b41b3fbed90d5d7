"""What a checkpoint is, and loading / writing whole SD 1.x/2.x and SDXL models for the tools.

Everything model-specific is the families': the loaders (:func:`library.families.sd.loading.load_sd_models`,
:func:`library.families.sdxl.loading.load_sdxl_models`) turn a single file or a Diffusers folder
into diffusers/transformers modules, ``ldm_state_dict()`` turns them back into the single-file
layout, and ``save_diffusers`` writes the Diffusers folder. This module only picks the family
(:func:`detect_kind`) and writes the results (atomically, one tensor at a time for
``.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import torch

from library.model_tools.tensor_files import TensorFileError, open_tensor_file, write_safetensors

logger = logging.getLogger(__name__)

__all__ = [
    "KIND_NAMES", "SUPPORTED_KINDS", "ModelToolError", "kind_of_keys", "detect_kind", "is_single_file",
    "dominant_dtype", "part_dtypes", "part_prefixes", "part_of", "load_models", "single_file_state_dict",
    "save_single_file", "family_models", "DENOISER_PREFIX", "with_article",
]

#: what each kind is called in messages
KIND_NAMES = {
    "sd1": "SD 1.x", "sd2": "SD 2.x", "sd_unet": "SD 1.x/2.x U-Net (no text encoder)", "sdxl": "SDXL base",
    "sdxl_refiner": "SDXL refiner", "flux": "FLUX.1", "sd3": "SD3/SD3.5", "lora": "LoRA/network",
    "vae": "VAE", "unknown": "unknown model",
}
#: kinds the loaders and savers handle
SUPPORTED_KINDS = ("sd1", "sd2", "sdxl")
#: key prefix of the denoiser in SD/SDXL/SD3 single files
DENOISER_PREFIX = "model.diffusion_model."

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ModelToolError(ValueError):
    """A model, flag or path a tool cannot use; the message (one line) names it and the fix."""


def is_single_file(path: str | os.PathLike) -> bool:
    """``.safetensors``/``.ckpt``/... path (what the extension says; the file need not exist)."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def kind_of_keys(keys: Iterable[str]) -> str:
    """The kind of a single-file checkpoint from its key names (see :data:`KIND_NAMES`)."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "lora"
    if any(k.startswith("double_blocks.") or ".double_blocks." in k for k in keys):
        return "flux"
    if any(k.startswith("joint_blocks.") or ".joint_blocks." in k for k in keys):
        return "sd3"
    if has("conditioner.embedders."):
        return "sdxl" if has("conditioner.embedders.1.model.") else "sdxl_refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if has(DENOISER_PREFIX):
        return "sdxl" if f"{DENOISER_PREFIX}label_emb.0.0.weight" in keys else "sd_unet"
    if any(k.endswith(("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"))
           for k in keys):
        return "vae"
    return "unknown"


def detect_kind(path: str | os.PathLike) -> str:
    """The kind of a single file (from its keys) or a Diffusers folder (from its sub-folders/configs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "text_encoder_2" / "config.json").is_file():
            return "sdxl"
        config = path / "text_encoder" / "config.json"
        if config.is_file() and (path / "unet" / "config.json").is_file():
            hidden_act = json.loads(config.read_text(encoding="utf-8")).get("hidden_act", "quick_gelu")
            return "sd2" if hidden_act == "gelu" else "sd1"
        if (path / "transformer" / "config.json").is_file():
            return "flux" if "Flux" in (path / "transformer" / "config.json").read_text(encoding="utf-8") else "sd3"
        return "unknown"
    try:
        with open_tensor_file(path) as f:
            return kind_of_keys(f.keys())
    except TensorFileError as e:
        raise ModelToolError(str(e)) from None


def dominant_dtype(dtypes_and_sizes: Iterable[tuple[torch.dtype, int]]) -> torch.dtype:
    """The floating dtype holding most of the elements (float32 when there are none)."""
    counts: Counter = Counter()
    for dtype, size in dtypes_and_sizes:
        if dtype.is_floating_point:
            counts[dtype] += size
    return counts.most_common(1)[0][0] if counts else torch.float32


#: the parts of a model as the families' ``checkpoint_prefixes`` name them, and their Diffusers sub-folders
PART_FOLDERS = {"denoiser": ("unet",), "vae": ("vae",), "text_encoders": ("text_encoder", "text_encoder_2")}


def part_prefixes(kind: str) -> dict[str, tuple[str, ...]]:
    """``{"denoiser" | "text_encoders" | "vae": single-file key prefixes}`` (the family's own)."""
    family, _ = _family_class(kind)
    return family().checkpoint_prefixes()


def part_of(key: str, prefixes: Mapping[str, tuple[str, ...]]) -> str | None:
    return next((part for part, ps in prefixes.items() if key.startswith(ps)), None)


def part_dtypes(path: str | os.PathLike, kind: str, variant: str | None = None) -> dict[str, torch.dtype]:
    """The floating dtype each part of a model is stored in (most of its elements), from file headers:
    a single file's keys by the family's prefixes, or a Diffusers folder's ``unet/``, ``vae/``,
    ``text_encoder*/`` weight files. A part whose dtype cannot be read is float32."""
    import math

    path = Path(path)
    sizes: dict[str, list[tuple[torch.dtype, int]]] = {part: [] for part in PART_FOLDERS}
    if path.is_dir():
        for part, folders in PART_FOLDERS.items():
            for folder in folders:
                for weights in _weight_files(path / folder, variant):
                    with open_tensor_file(weights) as f:
                        sizes[part] += [(info.dtype, math.prod(info.shape)) for info in f.infos()]
    else:
        prefixes = part_prefixes(kind)
        with open_tensor_file(path) as f:
            for info in f.infos():
                part = part_of(info.name, prefixes)
                if part is not None:
                    sizes[part].append((info.dtype, math.prod(info.shape)))
    return {part: dominant_dtype(values) for part, values in sizes.items()}


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """A Diffusers sub-folder's weight files (``.safetensors`` preferred), of ``variant`` when given."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if variant:  # model.fp16.safetensors, model.fp16-00001-of-00002.safetensors
        files = [p for p in files if p.stem.endswith(f".{variant}") or f".{variant}-" in p.name]
    else:
        files = [p for p in files if "." not in p.stem]
    return sorted([p for p in files if p.suffix == ".safetensors"] or files)


def load_models(path: str | os.PathLike, kind: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                variant: str | None = None, state_dict: dict[str, torch.Tensor] | None = None):
    """``SDModels`` (sd1/sd2) or ``SDXLModels`` (sdxl) from a single file or Diffusers folder."""
    if kind not in SUPPORTED_KINDS:
        raise ModelToolError(f"{path} is {with_article(kind)}: only SD 1.x, SD 2.x and SDXL base models are "
                             f"supported here")
    if kind == "sdxl":
        from library.families.sdxl.loading import load_sdxl_models

        return load_sdxl_models(path, dtype=dtype, device=device, variant=variant, state_dict=state_dict)
    from library.families.sd.loading import load_sd_models

    return load_sd_models(path, v2=kind == "sd2", dtype=dtype, device=device, variant=variant, state_dict=state_dict)


def with_article(kind: str) -> str:
    """``"an SD 1.x"``, ``"a VAE"``, ``"an unknown model"``: the kind's name for messages."""
    name = KIND_NAMES.get(kind, kind)
    vowel = name[:1].lower() in "aeiou" or name.startswith("SD")  # "an SD 1.x", "a LoRA", "a FLUX.1"
    return ("an " if vowel else "a ") + name


def single_file_state_dict(models, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The models as one single-file state dict (the family's ``ldm_state_dict``), floating tensors
    cast to ``dtype`` when given."""
    with torch.no_grad():
        state = models.ldm_state_dict()
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items()}


def save_single_file(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                     metadata: Mapping[str, str] | None = None, epoch: int = 0, global_step: int = 0) -> None:
    """``.safetensors`` (with ``metadata``) or a ``.ckpt`` pickle ``{"state_dict", "epoch", "global_step"}``,
    written atomically."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        write_safetensors(path, state, metadata or None)
        return
    from library.io_utils import save_torch

    if metadata:
        logger.warning("%s is a torch file: --metadata is only stored in .safetensors files", path.name)
    save_torch({"state_dict": dict(state), "epoch": int(epoch), "global_step": int(global_step)}, path)


def _family_class(kind: str):
    """``(family class, name of the models in FamilyModels.extra)``."""
    if kind == "sdxl":
        from library.families.sdxl.family import SDXLFamily

        return SDXLFamily, "sdxl"
    from library.families.sd.family import StableDiffusionFamily

    return StableDiffusionFamily, "sd"


def text_encoders_of(models) -> list[torch.nn.Module]:
    return list(models.text_encoders) if hasattr(models, "text_encoders") else [models.text_encoder]


def family_models(models, kind: str):
    """``(family, FamilyModels)`` of loaded models, for the family's ``save_diffusers``."""
    from library.families.base import FamilyModels

    family, extra = _family_class(kind)
    tokenizers = list(models.tokenizers) if hasattr(models, "tokenizers") else [models.tokenizer]
    return family(), FamilyModels(denoiser=models.unet, vae=models.vae, text_encoders=text_encoders_of(models),
                                  tokenizers=tokenizers, extra={extra: models})
