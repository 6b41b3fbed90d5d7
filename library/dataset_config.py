"""Dataset configuration: from ``--dataset_config`` or the CLI-only flags to a dataset group.

Each setting is resolved subset -> dataset -> ``[general]`` -> command line -> built-in default.
The command line takes part with every dataset flag *including its argparse default* (e.g.
``--caption_extension`` ".caption"), so a value written in the TOML always wins and the flags fill
what the TOML leaves out. ``batch_size`` falls back to ``--train_batch_size`` and ``num_repeats``
to ``--dataset_repeats``; ``--caption_extention`` (old spelling) overrides ``--caption_extension``.

CLI-only mode (no ``--dataset_config``): ``--train_data_dir`` holds one DreamBooth subset per
sub-folder named ``<repeats>_<class tokens>``; ``--reg_data_dir`` the same for regularization
images; ``--in_json`` makes one fine-tuning subset (images in ``--train_data_dir``, repeats
``--dataset_repeats``). ``--dataset_class pkg.module.Class`` replaces all of this.
``--conditioning_data_dir`` (with ``--masked_loss``) is the mask folder of every training
sub-folder (not of the regularization ones); with ``--dataset_config`` it is ignored and each
subset names its own ``conditioning_data_dir``.

ControlNet datasets (``conditioning_images=True``, the ControlNet trainers): every subset is an image
folder whose ``conditioning_data_dir`` holds one conditioning image per image (same file stem); the
batches carry them as ``conditioning_images``. CLI-only, ``--train_data_dir`` is that image folder
itself (not a parent of ``<repeats>_<name>`` folders) and ``--conditioning_data_dir`` its
conditioning folder, as in the reference.

Errors are :class:`~library.data.errors.DatasetError` with the file, folder or key path at fault.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Callable

import toml
import torch

from library import toml_text
from library.data.config_schema import validate_config
from library.data.custom import load_custom_dataset
from library.data.dataset import make_dataset
from library.data.errors import DatasetError
from library.data.group import DatasetGroup
from library.data.images import is_image_file, list_images
from library.data.params import (ControlNetSubsetParams, DatasetParams, DreamBoothSubsetParams, FineTuningSubsetParams,
                                 SubsetParams)
from library.data.subsets import ValidationSplit, check_conditioning_folders, check_mask_folders

logger = logging.getLogger(__name__)

_FOLDER_NAME = re.compile(r"(\d+)(?:_(.*))?", re.DOTALL)
# TOML key -> argparse destination, where they differ.
_CLI_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
_PATH_FIELDS = {"image_dir", "metadata_file", "conditioning_data_dir"}
_NON_RESOLVED = {"kind", "subsets", "where"}


# ------------------------------------------------------------------------------ CLI values


def _parse_pair(text: str, flag: str, cast: Callable[[str], Any]) -> tuple:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(cast(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1 and flag == "--resolution":
        values = values * 2
    if len(values) != 2:
        raise DatasetError(f"{flag} {text!r}: expected two comma-separated numbers" +
                           (" or one size" if flag == "--resolution" else ""))
    return values


def cli_values(args) -> dict[str, Any]:
    """The dataset flags of ``args`` as TOML key -> value (None values left out), converted."""
    names = {f.name for cls in (DatasetParams, DreamBoothSubsetParams, FineTuningSubsetParams)
             for f in dataclasses.fields(cls)} - _NON_RESOLVED - _PATH_FIELDS
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, _CLI_NAMES.get(name, name), None)
        if value is not None:
            out[name] = value
    if getattr(args, "caption_extention", None) is not None:
        out["caption_extension"] = args.caption_extention
    if isinstance(out.get("resolution"), str):
        out["resolution"] = _parse_pair(out["resolution"], "--resolution", int)
    if isinstance(out.get("face_crop_aug_range"), str):
        out["face_crop_aug_range"] = _parse_pair(out["face_crop_aug_range"], "--face_crop_aug_range", float)
    return out


# ------------------------------------------------------------------------------ resolution


def _normalize(name: str, value: Any) -> Any:
    if name == "resolution" and isinstance(value, int):
        return (value, value)
    if name in ("resolution", "face_crop_aug_range") and isinstance(value, (list, tuple)):
        return tuple(value)
    if name in _PATH_FIELDS and value is not None:
        return Path(value).expanduser()
    if name == "custom_attributes":
        return dict(value)
    return value


def _resolve(cls, layers: list[dict], cli: dict, fixed: dict) -> Any:
    """Instantiate ``cls`` taking each field from ``fixed``, the first layer that has it, ``cli``, or the default."""
    kwargs: dict[str, Any] = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in kwargs or f.name in _NON_RESOLVED:
            continue
        for layer in [*layers, cli]:
            if f.name in layer and layer[f.name] is not None:
                kwargs[f.name] = _normalize(f.name, layer[f.name])
                break
    return cls(**kwargs)


def _check_dataset(params: DatasetParams) -> None:
    where = params.where
    w, h = params.resolution
    problems = []
    if w <= 0 or h <= 0:
        problems.append(f"resolution must be positive (got {w}x{h})")
    if params.batch_size < 1:
        problems.append(f"batch_size must be >= 1 (got {params.batch_size})")
    if params.bucket_reso_steps < 1:
        problems.append(f"bucket_reso_steps must be >= 1 (got {params.bucket_reso_steps})")
    if not 0 <= params.validation_split < 1:
        problems.append(f"validation_split must be in [0, 1) (got {params.validation_split})")
    for s in params.subsets:
        subset = s.where.removeprefix(f"{where}.")  # "subsets[1]" after the dataset's own "where"
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(s, name) <= 1:
                problems.append(f"{subset}.{name} must be in [0, 1] (got {getattr(s, name)})")
        extension = getattr(s, "caption_extension", "")  # DreamBooth subsets only
        if any(c in extension for c in "/\\\0"):
            problems.append(f"{subset}.caption_extension must be a file extension such as \".txt\" (got {extension!r})")
        if not s.caption_separator:
            problems.append(f"{subset}.caption_separator must not be empty (the default is \",\")")
        if s.face_crop_aug_range is not None and not 0 < s.face_crop_aug_range[0] <= s.face_crop_aug_range[1]:
            problems.append(f"{subset}.face_crop_aug_range must be [min, max] with 0 < min <= max, e.g. [2.0, 4.0] "
                            f"(got {list(s.face_crop_aug_range)})")
    if problems:
        raise DatasetError(f"{where}: " + "; ".join(problems))


def _check_controlnet_dataset(dataset: dict, where: str) -> None:
    """Every subset of a ControlNet dataset is an image folder with a conditioning_data_dir: one error
    naming every subset that is not."""
    problems = []
    for i, s in enumerate(dataset.get("subsets", [])):
        missing = [key for key in ("image_dir", "conditioning_data_dir") if key not in s]
        if missing:
            problems.append(f"{where}.subsets[{i}] has no {' and no '.join(missing)}")
        if "metadata_file" in s:
            problems.append(f"{where}.subsets[{i}] has metadata_file (ControlNet subsets are image folders)")
        if s.get("is_reg"):
            problems.append(f"{where}.subsets[{i}] has is_reg = true (ControlNet training has no regularization "
                            "images)")
    if problems:
        raise DatasetError("ControlNet training: " + "; ".join(problems) + ". Each [[datasets.subsets]] needs "
                           "image_dir (the images) and conditioning_data_dir (one conditioning image per image, "
                           "same file stem)")


def _dataset_kind(dataset: dict, where: str, *, masked_loss: bool = False, controlnet: bool = False) -> str:
    if controlnet:
        _check_controlnet_dataset(dataset, where)
        return "dreambooth"
    subsets = dataset.get("subsets", [])
    ft = [i for i, s in enumerate(subsets) if "metadata_file" in s]
    if ft and len(ft) != len(subsets):
        raise DatasetError(f"{where}: mixes fine-tuning subsets (with metadata_file) and DreamBooth subsets "
                           "(image_dir only): put them in separate [[datasets]]")
    if not ft:
        for i, s in enumerate(subsets):
            if "image_dir" not in s:
                raise DatasetError(f"{where}.subsets[{i}]: image_dir is required for a DreamBooth subset "
                                   "(or give metadata_file for a fine-tuning subset)")
            if "conditioning_data_dir" in s and not masked_loss:
                raise DatasetError(f"{where}.subsets[{i}]: conditioning_data_dir (mask images for the loss) needs "
                                   "--masked_loss: add --masked_loss, or remove conditioning_data_dir")
        return "dreambooth"
    for i, s in enumerate(subsets):
        wrong = sorted({"is_reg", "class_tokens", "caption_extension", "cache_info", "conditioning_data_dir"} & set(s))
        if wrong:
            raise DatasetError(f"{where}.subsets[{i}]: {', '.join(wrong)} not valid in a fine-tuning subset "
                               "(one with metadata_file): remove it")
    return "fine_tuning"


def blueprints_from_config(config: dict, args, *, source: str = "dataset config",
                           controlnet: bool = False) -> list[DatasetParams]:
    """Resolve a validated config into dataset blueprints (see the module docstring for the order);
    ``controlnet``: every subset is a ControlNet subset."""
    cli = cli_values(args)
    general = config.get("general", {})
    blueprints = []
    for d, dataset in enumerate(config.get("datasets", [])):
        where = f"{source}: datasets[{d}]"
        kind = _dataset_kind(dataset, where, masked_loss=bool(getattr(args, "masked_loss", False)),
                             controlnet=controlnet)
        subset_cls = DreamBoothSubsetParams if kind == "dreambooth" else FineTuningSubsetParams
        if controlnet:
            subset_cls = ControlNetSubsetParams
        subsets = tuple(
            _resolve(subset_cls, [subset, dataset, general], cli, {"where": f"{where}.subsets[{s}]"})
            for s, subset in enumerate(dataset.get("subsets", []))
        )
        if all(layer.get("resolution") is None for layer in (dataset, general, cli)):
            raise DatasetError(f"{where}: resolution is not set: add resolution to [[datasets]] or [general], "
                               "or pass --resolution")
        params = _resolve(DatasetParams, [dataset, general], cli, {"kind": kind, "subsets": subsets, "where": where})
        _check_dataset(params)
        blueprints.append(params)
    if not blueprints:
        raise DatasetError(f"{source}: no [[datasets]] defined: add at least one [[datasets]] "
                           "with [[datasets.subsets]]")
    return blueprints


def load_config_file(path: str | Path) -> dict:
    """Read and validate a ``.toml`` or ``.json`` dataset config."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--dataset_config {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else toml_text.loads(text)
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset config {path} is not UTF-8: re-save it with UTF-8 encoding") from e
    except (ValueError, toml.TomlDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DatasetError(f"dataset config {path} cannot be parsed: {e}") from e
    return validate_config(data, str(path))


# ------------------------------------------------------------------------------ CLI-only


def _no_data_message(flag: str, parent: Path, seen: list[str] | None = None) -> str:
    if seen is None:
        seen = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    loose = [p.name for p in parent.iterdir() if p.is_file() and is_image_file(p)] if parent.is_dir() else []
    folders = ", ".join(repr(n) for n in seen) if seen else "none"
    msg = (f"No data found in {flag} {parent}: images must be in sub-folders named '<repeats>_<name>', e.g. "
           f"'10_sks dog' (10 repeats; 'sks dog' is the caption of images without a caption file). "
           f"Sub-folders seen: {folders}.")
    if loose:
        msg += f" {len(loose)} image(s) lie directly in {parent}: move them into such a sub-folder."
    return msg


def _folder_subsets(parent: Path, *, is_reg: bool, flag: str, cli: dict,
                    mask_dir: Path | None = None) -> tuple[list[SubsetParams], list[str]]:
    if not parent.is_dir():
        raise DatasetError(f"{flag} {parent} does not exist or is not a folder")
    subsets, seen = [], []
    for child in sorted(p for p in parent.iterdir() if p.is_dir()):
        seen.append(child.name)
        m = _FOLDER_NAME.fullmatch(child.name)
        if not m:
            logger.warning("%s: sub-folder %r skipped: its name does not start with '<repeats>_'", flag, child.name)
            continue
        fixed = {"image_dir": child, "num_repeats": int(m[1]), "class_tokens": m[2] or None, "is_reg": is_reg,
                 "conditioning_data_dir": mask_dir, "where": str(child)}
        subsets.append(_resolve(DreamBoothSubsetParams, [], cli, fixed))
    return subsets, seen


def _controlnet_cli_subset(args, cli: dict) -> SubsetParams:
    """The one ControlNet subset of ``--train_data_dir`` (the images) + ``--conditioning_data_dir``."""
    train_dir, cond_dir = getattr(args, "train_data_dir", None), getattr(args, "conditioning_data_dir", None)
    if not train_dir:
        raise DatasetError("no training data: give --dataset_config, or --train_data_dir (the images) with "
                           "--conditioning_data_dir (their conditioning images)")
    if not cond_dir:
        raise DatasetError(f"--train_data_dir {train_dir}: ControlNet training needs --conditioning_data_dir, the "
                           "folder with one conditioning image per training image (same file stem)")
    if getattr(args, "in_json", None):
        raise DatasetError(f"--in_json {args.in_json}: ControlNet datasets are image folders: drop --in_json and give "
                           "--train_data_dir and --conditioning_data_dir")
    folder = Path(train_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"--train_data_dir {folder} does not exist or is not a folder")
    if not list_images(folder) and any(p.is_dir() for p in folder.iterdir()):
        raise DatasetError(f"--train_data_dir {folder} has no images, only sub-folders: for ControlNet training it is "
                           "the image folder itself (not a parent of '<repeats>_<name>' folders); give that folder, "
                           "or one [[datasets.subsets]] per folder in a --dataset_config")
    fixed = {"image_dir": folder, "conditioning_data_dir": Path(cond_dir).expanduser(),
             "where": f"--train_data_dir {folder}"}
    return _resolve(ControlNetSubsetParams, [], cli, fixed)


def blueprints_from_cli(args, *, controlnet: bool = False) -> list[DatasetParams]:
    """Blueprint of the single dataset the CLI-only flags describe (``controlnet``: see the module docstring)."""
    cli = cli_values(args)
    if cli.get("resolution") is None:
        raise DatasetError("--resolution is not set: pass e.g. --resolution 512 (or 'width,height')")
    if controlnet:
        params = _resolve(DatasetParams, [], cli, {"kind": "dreambooth", "subsets": (_controlnet_cli_subset(args, cli),),
                                                   "where": "dataset"})
        _check_dataset(params)
        return [params]
    train_dir = getattr(args, "train_data_dir", None)
    mask_dir = getattr(args, "conditioning_data_dir", None)
    if mask_dir and not getattr(args, "masked_loss", False):
        raise DatasetError(f"--conditioning_data_dir {mask_dir}: mask images are only used with --masked_loss: "
                           "add --masked_loss, or drop --conditioning_data_dir")
    if mask_dir and getattr(args, "in_json", None):
        raise DatasetError(f"--conditioning_data_dir {mask_dir} works with --train_data_dir sub-folders, not with "
                           "--in_json: drop --in_json, or put the masks into the images' alpha channel "
                           "(--alpha_mask)")
    if getattr(args, "in_json", None):
        fixed = {"metadata_file": Path(args.in_json), "image_dir": Path(train_dir) if train_dir else None,
                 "where": f"--in_json {args.in_json}"}
        subsets: list[SubsetParams] = [_resolve(FineTuningSubsetParams, [], cli, fixed)]
        kind = "fine_tuning"
    else:
        if not train_dir:
            raise DatasetError("no training data: give --dataset_config, --train_data_dir or --in_json")
        subsets, seen = _folder_subsets(Path(train_dir), is_reg=False, flag="--train_data_dir", cli=cli,
                                        mask_dir=Path(mask_dir).expanduser() if mask_dir else None)
        if not subsets:
            raise DatasetError(_no_data_message("--train_data_dir", Path(train_dir), seen))
        reg_dir = getattr(args, "reg_data_dir", None)
        if reg_dir:
            subsets += _folder_subsets(Path(reg_dir), is_reg=True, flag="--reg_data_dir", cli=cli)[0]
        kind = "dreambooth"
    params = _resolve(DatasetParams, [], cli, {"kind": kind, "subsets": tuple(subsets), "where": "dataset"})
    _check_dataset(params)
    return [params]


# ------------------------------------------------------------------------------ building


def _split(params: DatasetParams, part: str, seed: int) -> ValidationSplit | None:
    if params.validation_split <= 0:
        return None
    split_seed = params.validation_seed if params.validation_seed is not None else seed
    return ValidationSplit(params.validation_split, split_seed, part)  # type: ignore[arg-type]


def build_dataset_group(args, *, tokenize: Callable[[list[str]], torch.Tensor] | None = None, latents_stride: int = 8,
                        bucket_reso_steps_multiple: int | None = None,
                        conditioning_images: bool = False) -> tuple[Any, DatasetGroup | None]:
    """Build the training group and, when a dataset sets ``validation_split``, the validation group.

    ``conditioning_images``: a ControlNet dataset (see the module docstring); batches carry
    ``conditioning_images`` float32 [B,3,H,W] in [0,1], each cropped and flipped as its image.

    DreamBooth and fine-tuning datasets are split alike: each subset's images (fine-tuning: its
    metadata keys) sorted, shuffled with ``validation_seed`` (else the seed), the first
    ceil(n * (1 - split)) trained on, the rest validated on with repeats 1; reg images are not split.

    Reads images headers and captions now, so bad input fails here, before any model work.
    ``args.seed`` fixes all data randomness (a random seed is drawn and logged when it is None).
    """
    if getattr(args, "dataset_class", None):
        return load_custom_dataset(args.dataset_class, args, tokenize=tokenize), None
    from_config = bool(getattr(args, "dataset_config", None))
    if from_config:
        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if getattr(args, n, None)]
        if ignored:
            logger.warning("%s ignored: --dataset_config is given", ", ".join(ignored))
        config = load_config_file(args.dataset_config)
        blueprints = blueprints_from_config(config, args, source=str(args.dataset_config),
                                            controlnet=conditioning_images)
    else:
        blueprints = blueprints_from_cli(args, controlnet=conditioning_images)
    seed = args.seed if getattr(args, "seed", None) is not None else random.randint(0, 2**31 - 1)
    if getattr(args, "seed", None) is None:
        logger.info("no --seed: data pipeline seed %d", seed)
    all_subsets = [s for params in blueprints for s in params.subsets]
    if getattr(args, "masked_loss", False) and not any(s.uses_masks for s in all_subsets):
        raise DatasetError("--masked_loss: no subset has masks: set conditioning_data_dir (a folder of mask images) "
                           "or alpha_mask = true on the subsets of " + (str(args.dataset_config) if from_config else
                                                                        "the dataset (or pass --alpha_mask)"))
    check_mask_folders(all_subsets)
    if conditioning_images:
        check_conditioning_folders(all_subsets)

    prior_loss_weight = getattr(args, "prior_loss_weight", None)
    common = dict(seed=seed, prior_loss_weight=1.0 if prior_loss_weight is None else prior_loss_weight,
                  tokenize=tokenize,
                  latents_stride=latents_stride, from_config=from_config,
                  max_train_steps=getattr(args, "max_train_steps", 0) or 0)
    train = DatasetGroup([make_dataset(p, index=i, split=_split(p, "train", seed)) for i, p in enumerate(blueprints)],
                         **common)
    if train.num_train_images == 0:
        if from_config:
            raise DatasetError(f"No training images found in any subset of {args.dataset_config}: "
                               "check the image_dir / metadata_file paths and num_repeats")
        raise DatasetError(_no_data_message("--train_data_dir", Path(args.train_data_dir or ".")) if not
                           getattr(args, "in_json", None) else f"No images listed in --in_json {args.in_json}")
    if bucket_reso_steps_multiple:
        train.verify_bucket_reso_steps(bucket_reso_steps_multiple)

    val_datasets = [make_dataset(p, index=i, split=_split(p, "validation", seed))
                    for i, p in enumerate(blueprints) if _split(p, "validation", seed) is not None]
    val_datasets = [ds for ds in val_datasets if len(ds)]
    validation = DatasetGroup(val_datasets, **common) if val_datasets else None
    return train, validation
