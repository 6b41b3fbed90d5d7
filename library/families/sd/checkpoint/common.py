"""Shared pieces of the SD single-file key maps: the LDM key prefixes, :class:`CheckpointError`,
:class:`Converted` and the renaming engine the U-Net, VAE and CLIP-L maps are written in."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from library.families.script_hints import fix_for

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."

StateDict = Mapping[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint (or state dict) that does not have the layout the caller needs.

    The message is one line saying what is wrong, where (file/key) and how to fix it.
    """


class Converted(NamedTuple):
    """Result of an LDM -> diffusers conversion.

    ``state_dict``: the converted tensors (shared with the input where no reshape was needed).
    ``used``: the source keys that went into ``state_dict``.
    ``unused``: source keys under this part's prefix that the map does not place in the model;
    the caller must keep them if it wants to write the file back unchanged.
    """

    state_dict: dict[str, torch.Tensor]
    used: frozenset[str]
    unused: tuple[str, ...]


def refuse_non_base_models(state_dict: StateDict, path: object) -> None:
    """Raise :class:`CheckpointError` for a LoRA/network file or a FLUX.1/SD3 checkpoint, naming the
    flag or script that takes it (the checks every U-Net family's loader starts with)."""
    keys = list(state_dict)
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        raise CheckpointError(f"{path} is a LoRA/network file, not a base model: give it with --network_weights "
                              f"and the base model with --pretrained_model_name_or_path")
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        raise CheckpointError(f"{path} is a FLUX.1 checkpoint (double_blocks.* keys): {fix_for('flux')}")
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        raise CheckpointError(f"{path} is an SD3 checkpoint (joint_blocks.* keys): {fix_for('sd3')}")


# --------------------------------------------------------------------------------------------
# The renaming engine: a list of module pairs, each with the parameter names inside the module.
# --------------------------------------------------------------------------------------------

Parts = tuple[tuple[str, str], ...]


def _same(*names: str) -> Parts:
    """Inner names that are identical on both sides."""
    return tuple((n, n) for n in names)


_WEIGHT_BIAS = _same("weight", "bias")
_WEIGHT = _same("weight")


@dataclass(frozen=True)
class _Module:
    """One module on both sides: ``ldm`` and ``diffusers`` prefixes (ending in ``.``), and the
    (ldm, diffusers) inner names it holds. An inner name ending in ``.`` is a sub-module prefix,
    otherwise it must equal the whole remaining key."""

    ldm: str
    diffusers: str
    parts: Parts


def _map_inner(inner: str, parts: Parts, to_diffusers: bool) -> str | None:
    for ldm_part, diff_part in parts:
        src, dst = (ldm_part, diff_part) if to_diffusers else (diff_part, ldm_part)
        if src.endswith("."):
            if inner.startswith(src):
                return dst + inner[len(src):]
        elif inner == src:
            return dst
    return None


def _rename(state_dict: StateDict, modules: Iterable[_Module], *, to_diffusers: bool, src_prefix: str,
            dst_prefix: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename every key under ``src_prefix`` through ``modules``.

    Returns (renamed dict, used source keys, unused source keys). Module prefixes never nest, so the
    first dotted prefix of a key found in the table is its module.
    """
    table = {(m.ldm if to_diffusers else m.diffusers): m for m in modules}
    out: dict[str, torch.Tensor] = {}
    used: list[str] = []
    unused: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        new_name = None
        dot = name.find(".")
        while dot != -1:
            module = table.get(name[: dot + 1])
            if module is not None:
                inner = _map_inner(name[dot + 1:], module.parts, to_diffusers)
                if inner is not None:
                    new_name = (module.diffusers if to_diffusers else module.ldm) + inner
                break
            dot = name.find(".", dot + 1)
        if new_name is None:
            unused.append(key)
        else:
            out[dst_prefix + new_name] = tensor
            used.append(key)
    return out, used, unused


def _strip(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _indices(names: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) at the start of ``names``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := regex.match(n))})


def _require(sd: Mapping[str, torch.Tensor], key: str, prefix: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: key '{prefix}{key}' is missing; the checkpoint is incomplete or not an "
                              f"SD1/SD2 checkpoint")
    return sd[key]


def _refuse_unplaced(unused: list[str], what: str) -> None:
    if unused:
        shown = ", ".join(unused[:5]) + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else "")
        raise CheckpointError(f"{what}: cannot place {len(unused)} key(s) in the LDM layout: {shown}; the model does "
                              f"not match the shape it is being saved with")
