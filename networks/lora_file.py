"""A LoRA file as data: its modules (down, up, alpha), their weight-space deltas, and writing one back.

The LoRA tools (merge, resize, extract, check) work on files, not on models. They share this
module: :func:`read_lora` / :func:`write_lora` (metadata kept, ``sshs_*`` hashes recomputed, atomic
write, never onto an input), :func:`lora_modules` (state dict -> :class:`LoRAWeights` per module,
with clear errors for keys that are not LoRA keys), :meth:`LoRAWeights.delta` (the update
``alpha / rank * up @ down`` in the adapted layer's weight layout, conv kernels included) and
:func:`low_rank` (the best rank-``r`` factors of a delta, by SVD), so every tool computes these
the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from library.io_utils import addnet_hashes, save_safetensors, save_torch
from networks.lora_modules import lora_delta_weight

__all__ = ["LoRAWeights", "LoRAFileError", "read_lora", "write_lora", "lora_modules", "modules_to_state_dict",
           "low_rank"]

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


class LoRAFileError(ValueError):
    """A file that is not a LoRA of the kind a tool needs; the message names the file and the fix."""


@dataclass
class LoRAWeights:
    """One LoRA module of a file: ``down`` [r, in(, kh, kw)], ``up`` [out, r(, 1, 1)], ``alpha``."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def is_spatial_conv(self) -> bool:
        """A 3x3 (or larger) kernel: the modules ``conv_dim`` sets the rank of."""
        return self.is_conv and tuple(self.down.shape[2:]) != (1, 1)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """``alpha / rank * up @ down`` shaped like the adapted layer's weight, in ``dtype``."""
        up = self.up.to(device=device, dtype=dtype)
        down = self.down.to(device=device, dtype=dtype)
        return lora_delta_weight(up, down, self.scale)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a ``.safetensors`` LoRA (metadata may be empty) or a torch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except (SafetensorError, OSError) as e:
            raise LoRAFileError(f"{path}: not a readable safetensors file ({e}); an interrupted download or copy "
                                f"leaves such files, fetch or save it again") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a torch file that is damaged, or a pickle of other objects: same answer
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoRAFileError(f"{path}: not a readable LoRA file ({reason}); give a .safetensors or .pt LoRA "
                            f"state dict") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoRAFileError(f"{path}: not a LoRA state dict (expected a mapping of names to tensors)")
    return state, {}


def lora_modules(state_dict: Mapping[str, torch.Tensor], source: str = "LoRA") -> dict[str, LoRAWeights]:
    """Group ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` keys into modules.

    A missing alpha, or an alpha of 0, means alpha = rank (the format's rule, as the network
    loader reads it). Raises :class:`LoRAFileError` for keys
    that are not of this form (LoCon/LoHa/OFT/diffusers-PEFT files), a module missing its down or up
    weight, or ranks that disagree between down and up.
    """
    foreign = [k for k in state_dict if k.partition(".")[2] not in _SUFFIXES]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        raise LoRAFileError(f"{source}: {len(foreign)} key(s) are not LoRA lora_down/lora_up/alpha keys, e.g. {shown}; "
                            f"this tool handles kohya-format LoRA files only")
    names = sorted({k.partition(".")[0] for k in state_dict})
    modules = {}
    for name in names:
        down, up = state_dict.get(f"{name}.lora_down.weight"), state_dict.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise LoRAFileError(f"{source}: module {name} has no {'lora_down' if down is None else 'lora_up'}.weight; "
                                f"the file is incomplete")
        if down.shape[0] != up.shape[1]:
            raise LoRAFileError(f"{source}: module {name} has rank {down.shape[0]} in lora_down but {up.shape[1]} in "
                                f"lora_up; the file is corrupt")
        alpha_t = state_dict.get(f"{name}.alpha")
        alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None and alpha_t.numel() else 0.0
        alpha = alpha or float(down.shape[0])
        modules[name] = LoRAWeights(name, down, up, alpha)
    return modules


def modules_to_state_dict(modules: Mapping[str, LoRAWeights], dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """The kohya keys of ``modules`` (alpha as a 0-dim tensor), tensors cast to ``dtype`` if given."""
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        out[f"{name}.lora_down.weight"] = cast(m.down.contiguous())
        out[f"{name}.lora_up.weight"] = cast(m.up.contiguous())
        out[f"{name}.alpha"] = cast(torch.tensor(float(m.alpha)))
    return out


def write_lora(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
               *, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write a LoRA atomically: ``.safetensors`` with ``metadata`` and recomputed ``sshs_*`` hashes
    (the old ones would describe other tensors), otherwise a torch file. Refuses to overwrite any of
    ``inputs`` (a tool must never destroy the file it reads)."""
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise LoRAFileError(f"{path}: the output is one of the input files; choose another --save_to")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # (the folder is created by atomic_path, whose WriteError names this path if it cannot be)
    if path.suffix.lower() == ".safetensors":
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
        save_safetensors(tensors, path, meta)
    else:
        save_torch(tensors, path)


def low_rank(delta: torch.Tensor, rank: int, *, clamp_quantile: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (Linear [out, in] or conv [out, in, kh, kw]) by SVD.

    Returns ``(up, down, singular_values)`` with ``up`` [out, r(, 1, 1)] and ``down`` [r, in(, kh,
    kw)] so that ``up @ down`` (flattened) is the truncated SVD, the singular values split evenly
    (``sqrt(S)`` on each side) and all of them returned for rank statistics. ``clamp_quantile``
    clamps both factors to that quantile of their absolute values (kohya's extraction default
    0.99) to drop outliers. Computed in float32.
    """
    matrix = delta.float().flatten(1)
    rank = max(1, min(rank, *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if clamp_quantile is not None:
        limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if delta.ndim == 4:
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), s
