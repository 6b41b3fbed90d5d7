"""``tools/convert_diffusers20_original_sd.py``: Diffusers folder <-> single file, SD 1.x/2.x and SDXL.

The model is loaded by the family loader (which reads either form) and written by the family's
own writers: ``ldm_state_dict()`` for a single file, ``save_diffusers`` for a folder, so this
module has no key maps. What the Diffusers format cannot hold is made up on the way back by the
families' converters (and logged): SD 2.x's last OpenCLIP block, ``text_projection`` and
``logit_scale`` (SD 2.x conditions on the penultimate layer, so no model reads them), SDXL's
``logit_scale``, and single-file extras such as ``model_ema.*`` or ``alphas_cumprod``. Everything a
model holds converts exactly (bit for bit when no precision is asked for).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from library.model_tools.checkpoints import (KIND_NAMES, SUPPORTED_KINDS, ModelToolError, detect_kind, family_models,
                                             is_single_file, load_models, part_dtypes, part_of, part_prefixes,
                                             save_single_file, single_file_state_dict, text_encoders_of,
                                             with_article)

logger = logging.getLogger(__name__)

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def output_dtype(args) -> torch.dtype | None:
    """The dtype asked for by ``--fp16`` / ``--bf16`` / ``--float`` / ``--save_precision_as`` (at most one), or None."""
    chosen = [name for name in ("fp16", "bf16", "float") if getattr(args, name, False)]
    if args.save_precision_as not in (None, "no"):
        chosen.append(args.save_precision_as)
    if len(chosen) > 1:
        raise ModelToolError("give one precision: --fp16, --bf16, --float or --save_precision_as (not several)")
    return PRECISIONS[chosen[0]] if chosen else None


def parse_metadata(text: str | None) -> dict[str, str]:
    """``--metadata '{"key": "value"}'`` (JSON, or a Python dict literal) -> str -> str."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ModelToolError(f"--metadata {text!r}: not a dict, e.g. "
                                 f"'{{\"modelspec.title\": \"my model\"}}'") from None
    if not isinstance(value, dict):
        raise ModelToolError(f"--metadata {text!r}: expected a dict of names to values")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def check_kind_flags(kind: str, args, source: Path) -> None:
    """``--v1`` / ``--v2`` / ``--sdxl`` are optional (the model is recognised); when given they must fit."""
    flags = [name for name in ("v1", "v2", "sdxl") if getattr(args, name, False)]
    if len(flags) > 1:
        raise ModelToolError(f"--{' and --'.join(flags)} exclude each other")
    if kind not in SUPPORTED_KINDS:
        raise ModelToolError(f"{source} is {with_article(kind)}: this tool converts SD 1.x, SD 2.x and SDXL base "
                             f"models")
    wanted = {"v1": "sd1", "v2": "sd2", "sdxl": "sdxl"}
    if flags and wanted[flags[0]] != kind:
        right = {v: k for k, v in wanted.items()}[kind]
        raise ModelToolError(f"{source} is {with_article(kind)} model but --{flags[0]} is given: use --{right} "
                             f"(or leave the flag out; the model version is recognised)")


def _check_output(source: Path, target: Path, to_single: bool) -> None:
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise ModelToolError(f"{target} is the input; choose another output path")
    if to_single:
        if target.is_dir():
            raise ModelToolError(f"{target} is a folder: a single-file output needs a .safetensors/.ckpt path")
        return
    if target.is_file():
        raise ModelToolError(f"{target} is a file: a Diffusers output is a folder (give a path without a "
                             f".safetensors/.ckpt suffix)")
    if target.is_dir() and any(target.iterdir()) and not (target / "model_index.json").is_file():
        raise ModelToolError(f"{target} is a folder with other files (no model_index.json): choose a new or empty "
                             f"folder for the Diffusers model")


def _reference_folder(path: str | None) -> Path | None:
    if not path:
        return None
    folder = Path(path)
    if not folder.is_dir() or not any((folder / sub).is_dir() for sub in ("scheduler", "tokenizer")):
        raise ModelToolError(f"--reference_model {path}: must be a local Diffusers model folder with scheduler/ and/or "
                             f"tokenizer/ (nothing is downloaded)")
    return folder


def _use_reference_tokenizers(models, kind: str, reference: Path) -> None:
    from transformers import CLIPTokenizer

    names = [("tokenizer", "tokenizer")]
    if kind == "sdxl":
        names = [("tokenizer", "tokenizer1"), ("tokenizer_2", "tokenizer2")]
    for sub, attr in names:
        if (reference / sub).is_dir():
            setattr(models, attr, CLIPTokenizer.from_pretrained(str(reference), subfolder=sub, local_files_only=True))
            logger.info("tokenizer %s/ from %s", sub, reference)


def _use_reference_scheduler(folder: Path, reference: Path) -> None:
    if not (reference / "scheduler").is_dir():
        return
    shutil.rmtree(folder / "scheduler", ignore_errors=True)
    shutil.copytree(reference / "scheduler", folder / "scheduler")
    entry = None
    if (reference / "model_index.json").is_file():
        entry = json.loads((reference / "model_index.json").read_text(encoding="utf-8")).get("scheduler")
    if entry is None:
        config = json.loads((reference / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        entry = ["diffusers", config["_class_name"]]
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["scheduler"] = entry
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    logger.info("scheduler %s from %s", entry[1], reference)


def save_diffusers(models, kind: str, folder: Path, *, dtype: torch.dtype | None, safe_serialization: bool,
                   reference: Path | None = None) -> None:
    """The family's Diffusers folder (with ``reference``'s scheduler when given), written to
    ``<folder>.tmp`` and renamed into place, so an interrupted save leaves the old folder or none."""
    family, fm = family_models(models, kind)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        family.save_diffusers(fm, tmp, dtype=dtype, safe_serialization=safe_serialization)
        if reference is not None:
            _use_reference_scheduler(tmp, reference)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _in_stored_dtypes(state: dict[str, torch.Tensor], source: Path, kind: str,
                      stored: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Floating tensors back in the dtype the input stored them in: a single file's own per key, a
    Diffusers folder's per part (tensors the input did not have, e.g. made-up SD2 blocks, per part)."""
    own: dict[str, torch.dtype] = {}
    if not source.is_dir():
        from library.model_tools.tensor_files import open_tensor_file

        with open_tensor_file(source) as f:
            own = {info.name: info.dtype for info in f.infos()}
    prefixes = part_prefixes(kind)
    out = {}
    for key, value in state.items():
        dtype = own.get(key) or stored.get(part_of(key, prefixes) or "")
        keep = not value.is_floating_point() or dtype is None or not dtype.is_floating_point
        out[key] = value if keep else value.to(dtype)
    return out


def convert(args) -> None:
    source, target = Path(args.model_to_load), Path(args.model_to_save)
    if not source.exists():
        raise FileNotFoundError(f"model_to_load {source}: no such file or folder")
    to_single = is_single_file(target)
    _check_output(source, target, to_single)
    kind = detect_kind(source)
    check_kind_flags(kind, args, source)
    save_dtype = output_dtype(args)
    metadata = parse_metadata(args.metadata)
    reference = _reference_folder(args.reference_model)
    if args.variant and not source.is_dir():
        logger.warning("--variant selects the weight files of a Diffusers folder; ignored for %s", source.name)

    # Without a precision flag every part keeps the dtype it is stored in: the models are loaded in it
    # (float32 when the parts differ, which is exact) and each part is written back in its own.
    stored = part_dtypes(source, kind, args.variant if source.is_dir() else None)
    if save_dtype is not None:  # --fp16 also loads a Diffusers model as fp16
        load_dtype = save_dtype
    else:
        load_dtype = next(iter(stored.values())) if len(set(stored.values())) == 1 else torch.float32
    logger.info("loading %s (%s, %s) as %s", source, KIND_NAMES[kind], "Diffusers folder" if source.is_dir()
                else "single file", str(load_dtype).replace("torch.", ""))
    models = load_models(source, kind, dtype=load_dtype, variant=args.variant if source.is_dir() else None)

    if to_single:
        if reference is not None or args.use_safetensors or args.unet_use_linear_projection:
            logger.info("--reference_model, --use_safetensors and --unet_use_linear_projection apply to Diffusers "
                        "outputs; ignored for %s", target.name)
        state = single_file_state_dict(models, save_dtype)
        if save_dtype is None:
            state = _in_stored_dtypes(state, source, kind, stored)
        if target.suffix.lower() == ".safetensors" and source.suffix.lower() == ".safetensors":
            from library.model_tools.tensor_files import open_tensor_file

            with open_tensor_file(source) as f:
                kept = {k: v for k, v in f.metadata.items() if k != "modelspec.hash_sha256"}
            metadata = {**kept, **metadata}
        save_single_file(state, target, metadata=metadata, epoch=args.epoch, global_step=args.global_step)
        logger.info("saved %s (%d tensors)", target, len(state))
        return

    if metadata or args.epoch or args.global_step:
        logger.info("--metadata, --epoch and --global_step are stored in single files; ignored for a Diffusers folder")
    if args.unet_use_linear_projection:
        if kind == "sd2":
            from library.families.sd.loading import unet_with_projections

            models.unet = unet_with_projections(models.unet, linear=True)
        elif kind == "sd1":
            logger.warning("--unet_use_linear_projection applies to SD 2.x models; SD 1.x keeps 1x1-conv projections")
    if reference is not None:
        _use_reference_tokenizers(models, kind, reference)
    if save_dtype is None:  # each model in the dtype its part was stored in
        for module, part in [(models.unet, "denoiser"), (models.vae, "vae")] + [
                (te, "text_encoders") for te in text_encoders_of(models)]:
            if next(module.parameters()).dtype != stored[part]:
                module.to(dtype=stored[part])
    save_diffusers(models, kind, target, dtype=save_dtype, safe_serialization=args.use_safetensors,
                   reference=reference)
    logger.info("saved Diffusers folder %s", target)
