"""Split a DyLoRA file into plain LoRA files, one per rank ``unit, 2·unit, …, rank``.

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to lora.safetensors --unit 4

Same flags as kohya-ss/sd-scripts' ``networks/extract_lora_from_dylora.py`` (``docs/networks.md``).
A DyLoRA (``networks/dylora.py``) is trained so that its first ``t`` ranks, for every multiple
``t`` of ``unit``, form a working LoRA. For each such ``t`` this writes ``<save_to stem>-<t:04d>
<suffix>`` (``lora-0004.safetensors``, ``lora-0008.safetensors``, …) holding, for every module,
the first ``t`` rows of ``lora_down`` and columns of ``lora_up`` (a module of lower rank, e.g.
3x3 convs with a smaller ``conv_dim``, keeps all of its ranks) and the alpha that gives the rank-``t``
LoRA exactly the scale DyLoRA trained it with: ``alpha · sqrt(t / rank)`` (training at rank ``t``
scales by ``alpha/rank · sqrt(rank/t)``). The largest ``t`` is the full file.

``--unit`` defaults to the ``unit`` recorded in the file's ``ss_network_args``. ``.safetensors``
outputs keep the metadata with ``ss_network_module = networks.lora``, ``ss_network_dim`` and
``ss_network_alpha`` of the slice, ``unit`` dropped from ``ss_network_args``, and fresh ``sshs_*``
hashes; other suffixes are torch files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if __package__ in (None, ""):  # run as a script (python networks/extract_lora_from_dylora.py): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402  (no torch: --help stays instant)
from library.log import setup_logging  # noqa: E402

if TYPE_CHECKING:
    from networks.lora_file import LoRAWeights

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Split a DyLoRA into plain LoRA files of rank unit, 2*unit, ...")
    parser.add_argument("--model", type=str, required=True, help="DyLoRA file (.safetensors, .pt or .ckpt)")
    parser.add_argument("--save_to", type=str, required=True,
                        help="output name; each rank t is written as <stem>-<t:04d><suffix> (e.g. out-0004.safetensors)")
    parser.add_argument("--unit", type=int, default=None,
                        help="the DyLoRA unit the model was trained with (default: 'unit' from its ss_network_args)")
    add_logging_arguments(parser)
    return parser


def output_path(save_to: str | Path, rank: int) -> Path:
    """``out.safetensors`` and rank 4 -> ``out-0004.safetensors``."""
    path = Path(save_to)
    return path.with_name(f"{path.stem}-{rank:04d}{path.suffix}")


def unit_from_metadata(metadata: Mapping[str, str]) -> int | None:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
        return int(args["unit"]) if isinstance(args, dict) and "unit" in args else None
    except (ValueError, TypeError):
        return None


def slice_modules(modules: Mapping[str, "LoRAWeights"], rank: int) -> dict[str, "LoRAWeights"]:
    """Every module truncated to its first ``min(rank, its rank)`` ranks, alpha rescaled to match."""
    from networks.dylora import truncated_alpha
    from networks.lora_file import LoRAWeights

    out = {}
    for name, module in modules.items():
        keep = min(rank, module.rank)
        out[name] = LoRAWeights(name, module.down[:keep].clone(), module.up[:, :keep].clone(),
                                truncated_alpha(module.alpha, module.rank, keep))
    return out


def sliced_metadata(metadata: Mapping[str, str], rank: int, full_rank: int) -> dict[str, str]:
    from networks.dylora import truncated_alpha

    meta = dict(metadata)
    if not meta:
        return meta
    meta["ss_network_module"] = "networks.lora"
    meta["ss_network_dim"] = str(rank)
    try:
        meta["ss_network_alpha"] = str(truncated_alpha(float(meta["ss_network_alpha"]), full_rank, rank))
    except (KeyError, ValueError):
        pass
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
        if isinstance(args, dict) and "unit" in args:
            del args["unit"]
            meta["ss_network_args"] = json.dumps(args)
    except ValueError:
        pass
    return meta


def extract(model: str | Path, save_to: str | Path, unit: int | None = None) -> list[Path]:
    """Write the rank slices of ``model`` (see the module docstring); returns the written paths."""
    from networks.lora_file import LoRAFileError, lora_modules, modules_to_state_dict, read_lora, write_lora

    state, metadata = read_lora(model)
    modules = lora_modules(state, str(model))
    if not modules:
        raise LoRAFileError(f"{model}: no LoRA modules in the file")
    unit = unit or unit_from_metadata(metadata)
    if not unit:
        raise LoRAFileError(f"{model}: the file does not record its DyLoRA unit (ss_network_args); give --unit")
    if unit < 1:
        raise LoRAFileError(f"--unit {unit}: must be a positive integer")
    odd = sorted(name for name, m in modules.items() if m.rank % unit)
    if odd:
        raise LoRAFileError(f"{model}: {len(odd)} modules have a rank that is not a multiple of --unit {unit}, e.g. "
                            f"{odd[0]} (rank {modules[odd[0]].rank}); was it trained with another unit?")
    full_rank = max(m.rank for m in modules.values())
    dtype = next(iter(modules.values())).down.dtype  # the weights' dtype (alpha may be stored as float32)
    written = []
    for rank in range(unit, full_rank + 1, unit):
        path = output_path(save_to, rank)
        sliced = slice_modules(modules, rank)
        write_lora(path, modules_to_state_dict(sliced, dtype), sliced_metadata(metadata, rank, full_rank),
                   inputs=(model,))
        logger.info("rank %d -> %s", rank, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from networks.lora_file import LoRAFileError

    try:
        written = extract(args.model, args.save_to, args.unit)
    except (LoRAFileError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    logger.info("wrote %d LoRA files", len(written))


if __name__ == "__main__":
    main(sys.argv[1:])
