"""Loading SD 1.x/2.x models from a single-file checkpoint or a Diffusers folder, offline.

:func:`load_sd_models` returns diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` and a
transformers ``CLIPTextModel`` whatever the source, plus what a saver needs to write the single
file back in the layout it came in (:meth:`SDModels.ldm_state_dict`).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.families.sd.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    refuse_non_base_models,
    TextEncoderShape,
    UNetShape,
    VAEShape,
    detect_text_encoder_kind,
    infer_text_encoder_shape,
    infer_unet_shape,
    infer_vae_shape,
    infer_vae_shape_from_diffusers,
    modernize_diffusers_vae_keys,
    placeholder_openclip_keys,
    text_encoder_diffusers_to_ldm,
    text_encoder_kind_of_config,
    text_encoder_ldm_to_diffusers,
    transformers_text_prefix,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from library.families.sd.tokenizer import load_clip_tokenizer
from library.families.script_hints import fix_for

logger = logging.getLogger(__name__)


@dataclass
class SDModels:
    """Loaded SD 1.x/2.x models.

    ``unet_shape`` / ``vae_shape`` / ``text_encoder_shape`` describe the models as a single file
    stores them; ``ldm_extras`` holds the single-file tensors no model uses (``model_ema.*``,
    ``alphas_cumprod``, ``...position_ids``, SD2's last OpenCLIP block, ``text_projection``,
    ``logit_scale`` ...), kept unchanged for :meth:`ldm_state_dict`. ``source`` is the path loaded.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    v2: bool
    unet_shape: UNetShape
    vae_shape: VAEShape
    text_encoder_shape: TextEncoderShape
    ldm_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""

    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        """The models' current weights as one SD single-file state dict, extras included.

        For a model loaded from a single file (and not trained) this equals the file's state dict:
        same keys, shapes and values (in the models' dtype; extras in their own).
        """
        te = text_encoder_diffusers_to_ldm(self.text_encoder.state_dict(), self.text_encoder_shape,
                                           kept=self.ldm_extras)
        if self.text_encoder_shape.kind == "openclip":
            made_up = [k for k in placeholder_openclip_keys(self.text_encoder_shape) if k not in self.ldm_extras]
            if made_up:
                logger.warning("the SD2 text encoder has no last OpenCLIP block / text_projection / logit_scale "
                               "(loaded from a Diffusers folder); writing placeholders SD2 never reads")
        return {
            **self.ldm_extras,
            **te,
            **vae_diffusers_to_ldm(self.vae.state_dict(), self.vae_shape),
            **unet_diffusers_to_ldm(self.unet.state_dict(), self.unet_shape),
        }


def load_sd_models(path: str | os.PathLike, *, v2: bool, vae_path: str | os.PathLike | None = None,
                   tokenizer_cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", keep_extras: bool = True,
                   state_dict: dict[str, torch.Tensor] | None = None, variant: str | None = None) -> SDModels:
    """Load an SD 1.x (``v2=False``) or 2.x (``v2=True``) model.

    ``path``: a ``.safetensors`` / ``.ckpt`` single file in the original layout (fp32/fp16/bf16;
    ``.ckpt`` may nest the weights under ``state_dict``) or a Diffusers folder (``unet/``,
    ``vae/``, ``text_encoder/``, optional ``tokenizer/``). ``vae_path`` replaces the VAE (see
    :func:`load_vae`). The tokenizer comes from ``tokenizer_cache_dir``, the folder's
    ``tokenizer/`` or open_clip's vocabulary (see :func:`~library.families.sd.tokenizer.load_clip_tokenizer`).
    Weights are cast to ``dtype`` and put on ``device``; the U-Net and VAE use the SDPA attention
    processor. ``keep_extras=False`` drops the unused single-file tensors
    (``model_ema.*`` can be as large as the U-Net) when nothing will write the file back.
    ``state_dict``: the single file's tensors when the caller already has them (e.g. ``meta``
    tensors made from the file's header, with ``device="meta"``, for shape-only models);
    ``variant``: the Diffusers weight variant to read from a folder (``fp16`` reads
    ``diffusion_pytorch_model.fp16.safetensors``).

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` (one line: what,
    where, which flag to fix) for an SDXL/FLUX/SD3/LoRA/VAE-only file or a ``--v2`` mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (--pretrained_model_name_or_path must be a local "
                                f".safetensors/.ckpt file or Diffusers folder; nothing is downloaded)")
    if path.is_dir():
        return _load_diffusers_folder(path, v2=v2, vae_path=vae_path, tokenizer_cache_dir=tokenizer_cache_dir,
                                      dtype=dtype, device=device, variant=variant)
    return _load_single_file(path, v2=v2, vae_path=vae_path, tokenizer_cache_dir=tokenizer_cache_dir, dtype=dtype,
                             device=device, keep_extras=keep_extras, state_dict=state_dict)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file or a torch pickle (``.ckpt``/``.pt``/``.bin``), on CPU.

    ``mmap=False`` (``--disable_mmap_load_safetensors``) reads a safetensors file into memory in one
    sequential read instead of memory-mapping it: much faster where page faults are slow (WSL,
    network drives), at the cost of holding the file bytes while the tensors are built.

    A pickle is read with ``weights_only=True``; an old checkpoint whose pickle holds other Python
    objects (training callbacks) is read again without that restriction, with a warning, since that
    runs code from the file. A top-level ``state_dict`` entry is unwrapped; non-tensor entries
    (``epoch``, ``global_step``) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); an interrupted download or copy leaves such "
                              f"files, fetch it again")
    if path.suffix == ".safetensors":
        try:
            if not mmap:
                return load_safetensors_bytes(path.read_bytes())
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); an interrupted download or "
                                  f"copy leaves such files, fetch it again") from e
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise _unreadable_checkpoint(path, e) from e
        # torch words every pickle its restricted reader refuses alike, damaged or holding Python
        # objects; the full reader tells them apart (and its error is the one worth showing).
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as full_error:  # noqa: BLE001 - whatever a damaged pickle raises, the answer is the same
            raise _unreadable_checkpoint(path, full_error) from full_error
        logger.warning("%s holds pickled Python objects besides tensors; it was loaded fully, which runs code from "
                       "the file. Convert it to .safetensors to avoid this.", path)
    except Exception as e:  # noqa: BLE001 - a damaged file makes the unpickler raise anything (even IndexError)
        raise _unreadable_checkpoint(path, e) from e
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _unreadable_checkpoint(path: Path, error: BaseException) -> CheckpointError:
    if isinstance(error, (IndexError, KeyError, TypeError, AttributeError)):  # the unpickler tripped over garbage
        reason = "its pickle data is damaged"
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason}); an interrupted download or copy "
                           f"leaves such files, fetch it again (or use its .safetensors version)")


def _has_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state_dict)


def check_sd_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, v2: bool,
                        need_vae: bool = True) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` is an SD1 (``v2=False``) / SD2
    (``v2=True``) single-file checkpoint; the message names the file and the fix."""
    keys = list(state_dict)
    refuse_non_base_models(state_dict, path)
    if _has_prefix(state_dict, "conditioner.embedders."):
        raise CheckpointError(f"{path} is an SDXL checkpoint (conditioner.embedders.* keys): {fix_for('sdxl')}")
    if not _has_prefix(state_dict, UNET_PREFIX):
        if _has_prefix(state_dict, VAE_PREFIX) or "encoder.down.0.block.0.conv1.weight" in state_dict \
                or "encoder.down_blocks.0.resnets.0.conv1.weight" in state_dict:
            raise CheckpointError(f"{path} holds only a VAE: give it with --vae and the base model with "
                                  f"--pretrained_model_name_or_path")
        if _has_prefix(state_dict, "down_blocks.") or _has_prefix(state_dict, "conv_in."):
            raise CheckpointError(f"{path} is a Diffusers-layout U-Net weights file: pass the whole Diffusers "
                                  f"folder (with unet/, vae/, text_encoder/)")
        prefixes = sorted({k.split(".")[0] for k in keys})[:8]
        raise CheckpointError(f"{path} is not an SD1/SD2 checkpoint: no '{UNET_PREFIX}*' keys (top-level names: "
                              f"{', '.join(prefixes) or 'none'})")
    kind = detect_text_encoder_kind(state_dict)
    if kind is None:
        raise CheckpointError(f"{path} has no text encoder (neither cond_stage_model.transformer.* for SD1 nor "
                              f"cond_stage_model.model.* for SD2); such U-Net-only files cannot be trained here")
    if kind == "openclip" and not v2:
        raise CheckpointError(f"{path} is an SD2 model (OpenCLIP text encoder, cond_stage_model.model.*) but --v2 is "
                              f"not set: add --v2")
    if kind == "clip_l" and v2:
        raise CheckpointError(f"{path} is an SD1 model (CLIP-L text encoder, cond_stage_model.transformer.*) but --v2 "
                              f"is set: remove --v2")
    if need_vae and not _has_prefix(state_dict, VAE_PREFIX):
        raise CheckpointError(f"{path} has no VAE (first_stage_model.* keys): give one with --vae")


# --------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------

def materialize(make: Callable[[], torch.nn.Module], convert: Callable[[torch.nn.Module], dict[str, torch.Tensor]],
                 what: str, path: Path, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Create a model without initialising its weights, then assign the converted tensors to it.

    Parameters start on the meta device (no random init of a billion weights); buffers stay real
    because some (CLIP ``position_ids``) are not in any state dict.
    """
    with init_empty_weights(include_buffers=False):
        model = make()
    state_dict = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                  for k, v in convert(model).items()}
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: {what} weights do not fit the architecture read from them (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); the file is "
                              f"damaged or a variant this loader does not know")
    return model.to(device).eval()


def single_file_vae(state_dict: dict[str, torch.Tensor], path: Path, vae_path, used: set[str], *,
                    dtype: torch.dtype, device) -> tuple[AutoencoderKL, VAEShape]:
    """The VAE of a single file (``first_stage_model.*``), or the ``--vae`` replacement when given.

    Adds the file's VAE keys to ``used`` either way: a replaced VAE is not kept as an unused
    tensor, since the saver writes the VAE in use.
    """
    if vae_path is not None:
        used.update(k for k in state_dict if k.startswith(VAE_PREFIX))
        return load_vae(vae_path, dtype=dtype, device=device)
    vae_shape = infer_vae_shape(state_dict)

    def convert(_: torch.nn.Module) -> dict[str, torch.Tensor]:
        converted = vae_ldm_to_diffusers(state_dict, vae_shape)
        used.update(converted.used)
        return converted.state_dict

    vae = materialize(lambda: AutoencoderKL.from_config(vae_shape.diffusers_config()), convert, "VAE", path, dtype,
                      device)
    return vae, vae_shape


def unused_tensors(state_dict: dict[str, torch.Tensor], used: set[str], path: Path) -> dict[str, torch.Tensor]:
    """The single-file tensors no model took (kept so a save writes the file's keys back), logged."""
    extras = {k: v for k, v in state_dict.items() if k not in used}
    if extras:
        shown = ", ".join(sorted(extras)[:4]) + (" ..." if len(extras) > 4 else "")
        logger.info("%s: %d tensor(s) not used by the models are kept for saving: %s", path.name, len(extras), shown)
    return extras


def use_sdpa(model: UNet2DConditionModel | AutoencoderKL) -> None:
    model.set_attn_processor(AttnProcessor2_0())


def _load_single_file(path: Path, *, v2: bool, vae_path, tokenizer_cache_dir, dtype, device, keep_extras: bool,
                      state_dict: dict[str, torch.Tensor] | None = None) -> SDModels:
    if state_dict is None:
        state_dict = read_checkpoint(path)
    check_sd_state_dict(state_dict, path, v2=v2, need_vae=vae_path is None)
    used: set[str] = set()

    unet_shape = infer_unet_shape(state_dict)
    if unet_shape.is_sdxl:
        raise CheckpointError(f"{path} holds an SDXL U-Net (label_emb.* keys): {fix_for('sdxl')}")
    te_shape = infer_text_encoder_shape(state_dict)
    if unet_shape.cross_attention_dim != te_shape.hidden_size:
        raise CheckpointError(f"{path}: U-Net cross-attention width {unet_shape.cross_attention_dim} does not match "
                              f"the text encoder width {te_shape.hidden_size}; the file mixes models")

    def convert_unet(_: torch.nn.Module) -> dict[str, torch.Tensor]:
        converted = unet_ldm_to_diffusers(state_dict, unet_shape)
        used.update(converted.used)
        return converted.state_dict

    def convert_te(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        converted = text_encoder_ldm_to_diffusers(state_dict, te_shape, hf_prefix=transformers_text_prefix(model))
        used.update(converted.used)
        return converted.state_dict

    unet = materialize(lambda: UNet2DConditionModel.from_config(unet_shape.diffusers_config(v2=v2)), convert_unet,
                        "U-Net", path, dtype, device)
    text_encoder = materialize(lambda: CLIPTextModel(CLIPTextConfig(**te_shape.transformers_config())), convert_te,
                                "text encoder", path, dtype, device)
    vae, vae_shape = single_file_vae(state_dict, path, vae_path, used, dtype=dtype, device=device)
    use_sdpa(unet)
    use_sdpa(vae)
    extras = unused_tensors(state_dict, used, path) if keep_extras else {}
    logger.info("loaded SD%s single file %s (U-Net levels %s, text encoder %s with %d layers)", "2" if v2 else "1",
                path, unet_shape.block_out_channels, te_shape.kind, te_shape.num_layers)
    tokenizer = load_clip_tokenizer(v2=v2, cache_dir=tokenizer_cache_dir)
    return SDModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, v2=v2, unet_shape=unet_shape,
                    vae_shape=vae_shape, text_encoder_shape=te_shape, ldm_extras=extras, source=str(path))


def unet_with_projections(unet: UNet2DConditionModel, *, linear: bool, path: str | os.PathLike = "U-Net"
                          ) -> UNet2DConditionModel:
    """The same U-Net with Linear (``linear=True``, ``use_linear_projection``, as SD2 Diffusers folders
    have it) or 1x1-conv transformer ``proj_in``/``proj_out``; the weights are shared, only reshaped."""
    if bool(unet.config.use_linear_projection) == linear:
        return unet
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["use_linear_projection"] = linear

    def convert(_: torch.nn.Module) -> dict[str, torch.Tensor]:
        def reshaped(key: str, value: torch.Tensor) -> torch.Tensor:
            if not key.endswith((".proj_in.weight", ".proj_out.weight")):
                return value
            if linear and value.ndim == 4:
                return value[:, :, 0, 0]
            if not linear and value.ndim == 2:
                return value[:, :, None, None]
            return value
        return {k: reshaped(k, v) for k, v in unet.state_dict().items()}

    first = next(unet.parameters())
    return materialize(lambda: UNet2DConditionModel.from_config(config), convert, "U-Net", Path(path), first.dtype,
                        first.device)


def _load_diffusers_folder(path: Path, *, v2: bool, vae_path, tokenizer_cache_dir, dtype, device,
                           variant: str | None = None) -> SDModels:
    if (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path} is an SDXL Diffusers folder (text_encoder_2/): {fix_for('sdxl')}")
    missing = [sub for sub in ("unet", "text_encoder") + (("vae",) if vae_path is None else ())
               if not (path / sub / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{path} is a folder but not a Diffusers SD model: missing "
                              f"{', '.join(m + '/config.json' for m in missing)}")
    # SD 2.x single files store Linear proj_in/proj_out, SD 1.x 1x1 convs, whatever the folder's U-Net uses
    unet_shape = UNetShape.from_diffusers_config(UNet2DConditionModel.load_config(str(path), subfolder="unet"),
                                                 stored_linear_projection=v2)
    te_config = CLIPTextConfig.from_pretrained(str(path), subfolder="text_encoder", local_files_only=True)
    kind = text_encoder_kind_of_config(te_config)
    if kind == "openclip" and not v2:
        raise CheckpointError(f"{path} is an SD2 model (text encoder with GELU, OpenCLIP) but --v2 is not set: "
                              f"add --v2")
    if kind == "clip_l" and v2:
        raise CheckpointError(f"{path} is an SD1 model (CLIP-L text encoder) but --v2 is set: remove --v2")

    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True, variant=variant)
    unet = unet_with_projections(unet, linear=False, path=path)
    unet = unet.to(device=device, dtype=dtype).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", local_files_only=True,
                                                 variant=variant)
    text_encoder = text_encoder.to(device=device, dtype=dtype).eval()
    vae, vae_shape = load_vae(vae_path if vae_path is not None else path, dtype=dtype, device=device,
                              variant=variant if vae_path is None else None)
    use_sdpa(unet)
    use_sdpa(vae)
    logger.info("loaded SD%s Diffusers folder %s", "2" if v2 else "1", path)
    tokenizer = load_clip_tokenizer(v2=v2, cache_dir=tokenizer_cache_dir, diffusers_dir=path)
    return SDModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, v2=v2,
                    unet_shape=unet_shape, vae_shape=vae_shape,
                    text_encoder_shape=TextEncoderShape.from_transformers_config(text_encoder.config, kind),
                    source=str(path))


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             variant: str | None = None) -> tuple[AutoencoderKL, VAEShape]:
    """A VAE from: a Diffusers VAE folder (``config.json``) or model folder (``vae/``); a full SD
    single file (``first_stage_model.*``); a VAE-only file with LDM keys (``encoder.down.0...``,
    optionally under ``first_stage_model.`` or ``vae.``) or diffusers keys (``encoder.down_blocks...``).
    Returns the model (SDPA attention) and the :class:`VAEShape` a single-file save uses."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE not found: {path} (check --vae)")
    if path.is_dir():
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        if subfolder is None and not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: --vae folder has neither config.json nor vae/config.json")
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True, variant=variant)
        vae = vae.to(device=device, dtype=dtype).eval()
        use_sdpa(vae)
        return vae, VAEShape.from_diffusers_config(vae.config)

    state_dict = read_checkpoint(path)
    prefix = next((p for p in (VAE_PREFIX, "vae.", "") if f"{p}encoder.down.0.block.0.conv1.weight" in state_dict),
                  None)
    if prefix is not None:
        shape = infer_vae_shape(state_dict, prefix=prefix)

        def convert(_: torch.nn.Module) -> dict[str, torch.Tensor]:
            return vae_ldm_to_diffusers(state_dict, shape, prefix=prefix).state_dict
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in state_dict:
        diffusers_sd = modernize_diffusers_vae_keys(state_dict)
        shape = infer_vae_shape_from_diffusers(diffusers_sd)

        def convert(_: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v for k, v in diffusers_sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                           "post_quant_conv."))}
    else:
        raise CheckpointError(f"{path} is not a VAE: no 'encoder.down.0.block.0.conv1.weight' (LDM, optionally under "
                              f"first_stage_model.) or 'encoder.down_blocks.0.resnets.0.conv1.weight' (Diffusers) key")
    vae = materialize(lambda: AutoencoderKL.from_config(shape.diffusers_config()), convert, "VAE", path, dtype,
                       device)
    use_sdpa(vae)
    logger.info("loaded VAE from %s", path)
    return vae, shape
