"""ControlNet models from the base U-Net or from the files users have, offline.

    controlnet = load_controlnet(path, unet)      # --controlnet_model_name_or_path / --control_net_models
    controlnet = controlnet_from_unet(unet)       # a new ControlNet: the U-Net's encoder, zero convolutions

The model is always diffusers' ``ControlNetModel``. ``path`` may be

* a Diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``), or a pipeline
  folder with a ``controlnet/`` sub-folder;
* a single file (``.safetensors``, ``.ckpt``/``.pt``/``.pth``/``.bin``) in the Diffusers state-dict layout
  (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``: what the ControlNet trainers save);
* a single file in the original lllyasviel / LDM layout (``control_model.input_hint_block.*``,
  ``control_model.zero_convs.*``, ... or the same keys without the ``control_model.`` prefix), converted
  with diffusers' own ``convert_controlnet_checkpoint`` (SDXL ``label_emb`` through diffusers' key table).

A single file carries no config: it is derived from the base U-Net's config (the fields
``ControlNetModel.from_unet`` copies) and what the weights show (conditioning channels and widths,
transformer depth per level, linear or convolutional projections), so pruned ControlNets with fewer
transformer blocks load too. Nothing is fetched from the hub. A file that is no ControlNet, or one made
for another base model, is a :class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from library.families.sd.checkpoint.common import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["load_controlnet", "controlnet_from_unet", "controlnet_config", "read_state_dict",
           "original_to_diffusers", "CONTROLNET_FILE_SUFFIXES"]

CONTROLNET_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ORIGINAL_PREFIX = "control_model."

#: U-Net config fields a ControlNet shares with its U-Net (those ``ControlNetModel.from_unet`` copies).
_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
              "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
              "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
              "addition_time_embed_dim")


def controlnet_from_unet(unet: UNet2DConditionModel, *, conditioning_channels: int = 3) -> ControlNetModel:
    """A new ControlNet for ``unet``: its encoder weights copied, the zero convolutions zero (so it adds
    nothing until trained), float32 on the CPU."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels).to("cpu")
    return _cast(controlnet, torch.float32)


def load_controlnet(path: str | Path, unet: UNet2DConditionModel, *,
                    dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """The ControlNet stored at ``path`` (folder or file, see the module docstring) for ``unet``, in
    ``dtype`` on the CPU, in eval mode. Raises :class:`CheckpointError` for what cannot be used."""
    path = Path(path).expanduser()
    if path.is_dir():
        controlnet = _load_folder(path)
    elif path.is_file():
        state = read_state_dict(path)
        state = _diffusers_layout(state, unet, path)
        config = controlnet_config(unet.config, state)
        controlnet = _build(config, state, path)
    else:
        raise CheckpointError(f"ControlNet {path}: no such file or folder (give a Diffusers folder or a "
                              f"{'/'.join(CONTROLNET_FILE_SUFFIXES)} file)")
    check_compatible(controlnet, unet, path)
    logger.info("loaded ControlNet %s (%.1fM parameters)", path, sum(p.numel() for p in controlnet.parameters()) / 1e6)
    return _cast(controlnet, dtype).eval()


def _cast(model: ControlNetModel, dtype: torch.dtype) -> ControlNetModel:
    # Cast only when needed: diffusers warns on every dtype cast of a model.
    return model if next(model.parameters()).dtype == dtype else model.to(dtype=dtype)


# ------------------------------------------------------------------------------ files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single file (a ``state_dict`` nesting, as in ``.ckpt`` files, is unwrapped)."""
    suffix = path.suffix.lower()
    if suffix not in CONTROLNET_FILE_SUFFIXES:
        raise CheckpointError(f"ControlNet {path}: unknown file type {path.suffix!r}; give a "
                              f"{'/'.join(CONTROLNET_FILE_SUFFIXES)} file or a Diffusers folder")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a torn download or another format: say which file
        raise CheckpointError(f"ControlNet {path} cannot be read ({e}): re-download or re-save it") from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"ControlNet {path} holds no plain tensor dictionary: save it as .safetensors")
    return dict(state)


def _load_folder(path: Path) -> ControlNetModel:
    folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"ControlNet folder {path} has no config.json (a Diffusers ControlNet folder holds "
                              "config.json and diffusion_pytorch_model.safetensors)")
    try:
        return ControlNetModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointError(f"ControlNet folder {folder} cannot be loaded: {e}") from e


def _diffusers_layout(state: dict[str, torch.Tensor], unet: UNet2DConditionModel, path: Path) -> dict:
    """``state`` in the Diffusers layout, converting an original-layout file."""
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return state
    original = any(k.startswith(ORIGINAL_PREFIX + "input_hint_block.") or k.startswith("input_hint_block.")
                   for k in state)
    if original:
        return original_to_diffusers(state, layers_per_block=unet.config.layers_per_block)
    if any(k.startswith("lllite_unet") for k in state):
        raise CheckpointError(f"{path} is a ControlNet-LLLite file (lllite_unet.* keys), not a ControlNet: use it "
                              "with --control_net_lllite_models / sdxl_train_control_net_lllite.py")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raise CheckpointError(f"{path} is a LoRA file, not a ControlNet: give it with --network_weights")
    raise CheckpointError(f"{path} is not a ControlNet: it has neither controlnet_cond_embedding.* (Diffusers layout) "
                          "nor input_hint_block.* (original layout) keys")


def original_to_diffusers(state: Mapping[str, torch.Tensor], *, layers_per_block: int) -> dict[str, torch.Tensor]:
    """An original-layout (lllyasviel/LDM) ControlNet state dict in the Diffusers layout, through diffusers'
    ``convert_controlnet_checkpoint``; the SDXL ``label_emb`` (which that converter leaves out) through
    diffusers' own LDM key table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    state = dict(state)
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": layers_per_block})
    converted = {k: v for k, v in converted.items() if v is not None}  # the converter leaves None for absent keys
    bare = {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)} or state
    if "label_emb.0.0.weight" in bare:
        table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        for diffusers_key, ldm_key in table.items():
            if ldm_key in bare:
                converted[diffusers_key] = bare[ldm_key]
    return converted


# ------------------------------------------------------------------------------ config


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in state for m in [regex.match(k)] if m}


def controlnet_config(unet_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``ControlNetModel`` config of Diffusers-layout weights ``state`` made for a U-Net of ``unet_config``:
    the U-Net's fields, overridden by what the weights show."""
    config = {name: unet_config[name] for name in _FROM_UNET if name in unet_config}
    config["controlnet_conditioning_channel_order"] = "rgb"
    cond_in = state.get("controlnet_cond_embedding.conv_in.weight")
    if cond_in is None:
        raise CheckpointError("ControlNet weights have no controlnet_cond_embedding.conv_in.weight")
    config["conditioning_channels"] = int(cond_in.shape[1])
    widths = [int(cond_in.shape[0])]
    blocks = sorted(_indices(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$"))
    widths += [int(state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]) for i in blocks if i % 2 == 1]
    config["conditioning_embedding_out_channels"] = tuple(widths)

    levels = len(config["block_out_channels"])
    depths = []
    for level in range(levels):
        blocks_at = _indices(state, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        depths.append(max(blocks_at) + 1 if blocks_at else 0)
    mid = _indices(state, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    unet_depths = config.get("transformer_layers_per_block", 1)
    unet_depths = [unet_depths] * levels if isinstance(unet_depths, int) else list(unet_depths)
    attention = [d > 0 for d in depths]
    if any(attention):
        config["down_block_types"] = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        # Levels without attention keep the U-Net's value; diffusers' mid block reads the last entry.
        read = [d if d else unet_depths[i] for i, d in enumerate(depths)]
        if mid:
            read[-1] = max(mid) + 1
        if read != unet_depths:
            config["transformer_layers_per_block"] = tuple(read)
    projections = [v for k, v in state.items() if k.endswith((".proj_in.weight", ".proj_out.weight"))]
    if projections:
        config["use_linear_projection"] = projections[0].ndim == 2
    return config


def _build(config: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> ControlNetModel:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            controlnet = ControlNetModel.from_config(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"ControlNet {path} does not fit the base model's U-Net: {e}") from e
    expected = controlnet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("other shape", wrong)) if keys)
        raise CheckpointError(f"ControlNet {path} does not fit the base model's U-Net ({details}): use a ControlNet "
                              "trained for this base model (SD 1.x, SD 2.x or SDXL)")
    controlnet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return controlnet


def check_compatible(controlnet: ControlNetModel, unet: UNet2DConditionModel, path: Path) -> None:
    """The ControlNet's residuals fit ``unet``: same widths, blocks per level, text width, input channels
    and time/size embedding."""
    c, u = controlnet.config, unet.config
    checks = {
        "block_out_channels": (tuple(c.block_out_channels), tuple(u.block_out_channels)),
        "layers_per_block": (c.layers_per_block, u.layers_per_block),
        "cross_attention_dim": (c.cross_attention_dim, u.cross_attention_dim),
        "in_channels": (c.in_channels, u.in_channels),
        "addition_embed_type": (c.addition_embed_type, u.addition_embed_type),
    }
    wrong = [f"{name} {mine} (the U-Net has {theirs})" for name, (mine, theirs) in checks.items() if mine != theirs]
    if wrong:
        kind = "SDXL" if u.addition_embed_type == "text_time" else f"SD (text width {u.cross_attention_dim})"
        raise CheckpointError(f"ControlNet {path} is made for another base model: {'; '.join(wrong)}; use a "
                              f"ControlNet for this {kind} model")
