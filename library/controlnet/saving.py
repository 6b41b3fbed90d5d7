"""Writing a trained ControlNet: one file in diffusers' ``ControlNetModel`` state-dict layout, or a folder.

* ``safetensors`` (default): ``<name>.safetensors``, the ``ControlNetModel`` state dict (keys
  ``controlnet_cond_embedding.*``, ``down_blocks.*``, ``controlnet_down_blocks.*``, ``mid_block.*``,
  ``controlnet_mid_block.*``, ...) with the run's metadata (``modelspec.*``, ``ss_*``);
* ``ckpt`` / ``pt``: the same state dict through ``torch.save`` (no metadata);
* ``diffusers`` / ``diffusers_safetensors``: a Diffusers folder ``<name>/`` (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) that ``ControlNetModel.from_pretrained`` reads.

Every write is atomic: a temporary file or folder renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import ControlNetModel

from library.io_utils import save_safetensors, save_torch

SAVE_FORMATS = ("safetensors", "ckpt", "pt", "diffusers", "diffusers_safetensors")
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def controlnet_state_dict(controlnet: ControlNetModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the weights (cast to ``dtype`` when given), contiguous, ready to write."""
    state = {}
    for key, tensor in controlnet.state_dict().items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.to("cpu").contiguous()
    return state


def save_controlnet(controlnet: ControlNetModel, path: str | os.PathLike, *, fmt: str = "safetensors",
                    dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write ``controlnet`` to ``path`` in ``fmt`` (see the module docstring)."""
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"unknown ControlNet save format {fmt!r}; one of {', '.join(SAVE_FORMATS)}")
    path = Path(path)
    state = controlnet_state_dict(controlnet, dtype)
    if fmt == "safetensors":
        save_safetensors(state, path, metadata or None)
    elif fmt in ("ckpt", "pt"):
        save_torch(state, path)
    else:
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        controlnet.save_config(str(tmp))
        save_safetensors(state, tmp / DIFFUSERS_WEIGHTS_NAME, {"format": "pt"})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
