"""Loading SDXL base models from a single file (SAI/SGM layout) or a Diffusers folder, offline.

:func:`load_sdxl_models` returns diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``, transformers
``CLIPTextModel`` (text encoder 1, CLIP-L) and ``CLIPTextModelWithProjection`` (text encoder 2,
OpenCLIP bigG) and both tokenizers, whatever the source, plus what a saver needs to write the single
file back in its original layout (:meth:`SDXLModels.ldm_state_dict`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.families.sd.checkpoint import (
    CheckpointError,
    TextEncoderShape,
    UNetShape,
    VAEShape,
    infer_unet_shape,
    transformers_text_prefix,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_diffusers_to_ldm,
)
from library.families.sd.loading import (load_vae, materialize, read_checkpoint, single_file_vae, unused_tensors,
                                         use_sdpa)
from library.families.sd.tokenizer import SDXL_TOKENIZER2_ID, load_clip_tokenizer
from library.families.script_hints import fix_for
from library.families.sdxl.checkpoint import (
    TE1_PREFIX,
    TE2_PREFIX,
    check_sdxl_state_dict,
    te1_ldm_to_transformers,
    te1_shape,
    te1_transformers_to_ldm,
    te2_ldm_to_transformers,
    te2_projection_dim,
    te2_shape,
    te2_transformers_config,
    te2_transformers_to_ldm,
)

logger = logging.getLogger(__name__)


@dataclass
class SDXLModels:
    """Loaded SDXL models; the ``*_shape`` fields describe them as a single file stores them.

    ``ldm_extras`` holds the single-file tensors no model uses (``logit_scale``, ``position_ids``,
    ``denoiser.sigmas`` ...), kept unchanged for :meth:`ldm_state_dict`.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder1: CLIPTextModel
    text_encoder2: CLIPTextModelWithProjection
    tokenizer1: CLIPTokenizer
    tokenizer2: CLIPTokenizer
    unet_shape: UNetShape
    vae_shape: VAEShape
    te1_shape: TextEncoderShape
    te2_shape: TextEncoderShape
    ldm_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder1, self.text_encoder2]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer1, self.tokenizer2]

    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        """The models' current weights as one SDXL single-file state dict, extras included."""
        return {
            **self.ldm_extras,
            **te1_transformers_to_ldm(self.text_encoder1.state_dict(), self.te1_shape),
            **te2_transformers_to_ldm(self.text_encoder2.state_dict(), self.te2_shape, kept=self.ldm_extras),
            **vae_diffusers_to_ldm(self.vae.state_dict(), self.vae_shape),
            **unet_diffusers_to_ldm(self.unet.state_dict(), self.unet_shape),
        }


def load_sdxl_models(path: str | os.PathLike, *, vae_path: str | os.PathLike | None = None,
                     tokenizer_cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", keep_extras: bool = True, mmap: bool = True,
                     state_dict: dict[str, torch.Tensor] | None = None, variant: str | None = None) -> SDXLModels:
    """Load an SDXL base model.

    ``path``: a ``.safetensors``/``.ckpt`` single file in the SAI layout (fp32/fp16/bf16) or a
    Diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, optional
    ``tokenizer/``, ``tokenizer_2/``). ``vae_path`` replaces the VAE. Tokenizers come from
    ``tokenizer_cache_dir`` (``openai_clip-vit-large-patch14`` and
    ``laion_CLIP-ViT-bigG-14-laion2B-39B-b160k`` sub-folders), the folder's tokenizers, or open_clip's
    vocabulary. ``mmap=False`` reads a safetensors file in one go (``--disable_mmap_load_safetensors``).
    ``state_dict``: the single file's tensors when the caller already has them (e.g. ``meta`` tensors
    from the file's header, with ``device="meta"``); ``variant``: the Diffusers weight variant of a folder.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` (one line: what,
    where, which script or flag fits) for an SD1/SD2/FLUX/SD3/LoRA/refiner file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (--pretrained_model_name_or_path must be a local "
                                f".safetensors/.ckpt file or Diffusers folder; nothing is downloaded)")
    if path.is_dir():
        models = _load_diffusers_folder(path, vae_path=vae_path, dtype=dtype, device=device, variant=variant)
        diffusers_dir: Path | None = path
    else:
        models = _load_single_file(path, vae_path=vae_path, dtype=dtype, device=device, keep_extras=keep_extras,
                                   mmap=mmap, state_dict=state_dict)
        diffusers_dir = None
    models.tokenizer1 = load_clip_tokenizer(v2=False, cache_dir=tokenizer_cache_dir, diffusers_dir=diffusers_dir)
    models.tokenizer2 = load_clip_tokenizer(v2=True, cache_dir=tokenizer_cache_dir, diffusers_dir=diffusers_dir,
                                            repo_id=SDXL_TOKENIZER2_ID, subfolder="tokenizer_2")
    return models


def _load_single_file(path: Path, *, vae_path, dtype, device, keep_extras: bool, mmap: bool,
                      state_dict: dict[str, torch.Tensor] | None = None) -> SDXLModels:
    if state_dict is None:
        state_dict = read_checkpoint(path, mmap=mmap)
    check_sdxl_state_dict(state_dict, path, need_vae=vae_path is None)
    used: set[str] = set()

    unet_shape = infer_unet_shape(state_dict)
    shape1, shape2 = te1_shape(state_dict), te2_shape(state_dict)
    projection_dim = te2_projection_dim(state_dict)
    if unet_shape.cross_attention_dim != shape1.hidden_size + shape2.hidden_size:
        raise CheckpointError(f"{path}: U-Net cross-attention width {unet_shape.cross_attention_dim} is not the sum of "
                              f"the text encoder widths {shape1.hidden_size} + {shape2.hidden_size}; the file mixes "
                              f"models")
    size_embeddings = unet_shape.adm_in_channels - projection_dim
    if size_embeddings <= 0 or size_embeddings % 6:
        raise CheckpointError(f"{path}: label_emb takes {unet_shape.adm_in_channels} inputs, which is not the pooled "
                              f"text width {projection_dim} plus six equal size/crop embeddings")
    unet_shape = _with_time_embed_dim(unet_shape, size_embeddings // 6)

    def convert_with(fn, shape):
        def convert(_: torch.nn.Module) -> dict[str, torch.Tensor]:
            converted = fn(state_dict, shape)
            used.update(converted.used)
            return converted.state_dict
        return convert

    unet = materialize(lambda: UNet2DConditionModel.from_config(unet_shape.diffusers_config()),
                       convert_with(unet_ldm_to_diffusers, unet_shape), "U-Net", path, dtype, device)

    def convert_te1(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        converted = te1_ldm_to_transformers(state_dict, shape1, hf_prefix=transformers_text_prefix(model))
        used.update(converted.used)
        return converted.state_dict

    def convert_te2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        converted = te2_ldm_to_transformers(state_dict, shape2, hf_prefix=transformers_text_prefix(model))
        used.update(converted.used)
        return converted.state_dict

    te1 = materialize(lambda: CLIPTextModel(CLIPTextConfig(**shape1.transformers_config())), convert_te1,
                      "text encoder 1", path, dtype, device)
    te2 = materialize(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te2_transformers_config(shape2,
                                                                                                    projection_dim))),
                      convert_te2, "text encoder 2", path, dtype, device)
    vae, vae_shape = single_file_vae(state_dict, path, vae_path, used, dtype=dtype, device=device)
    use_sdpa(unet)
    use_sdpa(vae)
    extras = unused_tensors(state_dict, used, path) if keep_extras else {}
    logger.info("loaded SDXL single file %s (U-Net levels %s, depths %s; text encoders %d + %d layers)", path,
                unet_shape.block_out_channels, unet_shape.transformer_depth, shape1.num_layers, shape2.num_layers)
    return SDXLModels(unet=unet, vae=vae, text_encoder1=te1, text_encoder2=te2, tokenizer1=None, tokenizer2=None,
                      unet_shape=unet_shape, vae_shape=vae_shape, te1_shape=shape1, te2_shape=shape2,
                      ldm_extras=extras, source=str(path))


def _with_time_embed_dim(shape: UNetShape, dim: int) -> UNetShape:
    return replace(shape, addition_time_embed_dim=dim)


def _load_diffusers_folder(path: Path, *, vae_path, dtype, device, variant: str | None = None) -> SDXLModels:
    needed = ("unet", "text_encoder", "text_encoder_2") + (("vae",) if vae_path is None else ())
    missing = [sub for sub in needed if not (path / sub / "config.json").is_file()]
    if missing:
        hint = (f" (it looks like an SD1/SD2 folder: {fix_for('sd')})"
                if missing == ["text_encoder_2"] else "")
        raise CheckpointError(f"{path} is a folder but not a Diffusers SDXL model: missing "
                              f"{', '.join(m + '/config.json' for m in missing)}{hint}")
    unet_config = UNet2DConditionModel.load_config(str(path), subfolder="unet")
    if unet_config.get("addition_embed_type") != "text_time":
        raise CheckpointError(f"{path}/unet is not an SDXL U-Net (addition_embed_type is "
                              f"{unet_config.get('addition_embed_type')!r}, SDXL has 'text_time')")
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True, variant=variant)
    unet = unet.to(device=device, dtype=dtype).eval()
    te1 = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", local_files_only=True, variant=variant)
    te2 = CLIPTextModelWithProjection.from_pretrained(str(path), subfolder="text_encoder_2", local_files_only=True,
                                                      variant=variant)
    te1 = te1.to(device=device, dtype=dtype).eval()
    te2 = te2.to(device=device, dtype=dtype).eval()
    vae, vae_shape = load_vae(vae_path if vae_path is not None else path, dtype=dtype, device=device,
                              variant=variant if vae_path is None else None)
    use_sdpa(unet)
    use_sdpa(vae)
    logger.info("loaded SDXL Diffusers folder %s", path)
    shape1 = TextEncoderShape.from_transformers_config(te1.config, "clip_l")
    shape2 = TextEncoderShape.from_transformers_config(te2.config, "openclip")
    shape1 = replace(shape1, ldm_prefix=TE1_PREFIX)
    shape2 = replace(shape2, ldm_prefix=TE2_PREFIX, runs_all_blocks=True)
    return SDXLModels(unet=unet, vae=vae, text_encoder1=te1, text_encoder2=te2, tokenizer1=None, tokenizer2=None,
                      unet_shape=UNetShape.from_diffusers_config(unet.config), vae_shape=vae_shape,
                      te1_shape=shape1, te2_shape=shape2, source=str(path))
