"""The ``--dataset_config`` schema (voluptuous), and error messages a user can act on.

Three levels, each accepting a fixed set of keys (unknown keys are errors):

* ``[general]``: dataset keys + subset keys + DreamBooth keys that may be set higher up;
* ``[[datasets]]``: the same plus ``alpha_mask`` and ``subsets``;
* ``[[datasets.subsets]]``: subset keys + DreamBooth keys + ``image_dir``, ``is_reg``,
  ``metadata_file``, ``conditioning_data_dir``, ``alpha_mask``.

An unknown key is reported with its path (``datasets[0].subsets[1].num_repeat``) and the closest
valid key, or -- when the key is valid at another level -- where it belongs.
"""

from __future__ import annotations

import difflib
from typing import Any

from voluptuous import Any as AnyOf
from voluptuous import ExactSequence, In, Invalid, MultipleInvalid, Schema

from library.data.errors import DatasetError
from library.data.images import INTERPOLATIONS

_NUMBER = AnyOf(int, float, msg="expected a number")
_INTERPOLATION = In(sorted(INTERPOLATIONS), msg=f"expected one of {', '.join(sorted(INTERPOLATIONS))}")

DATASET_KEYS: dict[str, Any] = {
    "batch_size": int,
    "resolution": AnyOf(int, ExactSequence([int, int]), msg="expected an integer or [width, height]"),
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "bucket_no_upscale": bool,
    "network_multiplier": _NUMBER,
    "validation_seed": int,
    "validation_split": _NUMBER,
    "resize_interpolation": _INTERPOLATION,
}

SUBSET_KEYS: dict[str, Any] = {
    "num_repeats": int,
    "shuffle_caption": bool,
    "caption_separator": str,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "enable_wildcard": bool,
    "caption_prefix": str,
    "caption_suffix": str,
    "color_aug": bool,
    "flip_aug": bool,
    "face_crop_aug_range": ExactSequence([_NUMBER, _NUMBER], msg="expected two numbers [min, max]"),
    "random_crop": bool,
    "token_warmup_min": int,
    "token_warmup_step": _NUMBER,
    "custom_attributes": dict,
    "resize_interpolation": _INTERPOLATION,
    "caption_dropout_rate": _NUMBER,
    "caption_dropout_every_n_epochs": int,
    "caption_tag_dropout_rate": _NUMBER,
}

# DreamBooth keys that may also be set on a dataset or in [general].
DREAMBOOTH_KEYS: dict[str, Any] = {"caption_extension": str, "class_tokens": str, "cache_info": bool}

SUBSET_ONLY_KEYS: dict[str, Any] = {
    "image_dir": str, "is_reg": bool, "metadata_file": str, "conditioning_data_dir": str,
}
DATASET_OR_SUBSET_KEYS: dict[str, Any] = {"alpha_mask": bool}

GENERAL_KEYS = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_KEYS}
SUBSET_LEVEL_KEYS = {**SUBSET_KEYS, **DREAMBOOTH_KEYS, **SUBSET_ONLY_KEYS, **DATASET_OR_SUBSET_KEYS}
DATASET_LEVEL_KEYS = {**GENERAL_KEYS, **DATASET_OR_SUBSET_KEYS, "subsets": [Schema(SUBSET_LEVEL_KEYS)]}
CONFIG_SCHEMA = Schema({"general": GENERAL_KEYS, "datasets": [Schema(DATASET_LEVEL_KEYS)]})

_LEVEL_KEYS = {
    "top": {"general", "datasets"},
    "general": set(GENERAL_KEYS),
    "dataset": set(DATASET_LEVEL_KEYS),
    "subset": set(SUBSET_LEVEL_KEYS),
}
_LEVEL_NAMES = {"top": "the top level", "general": "[general]", "dataset": "[[datasets]]",
                "subset": "[[datasets.subsets]]"}


def format_path(path: list) -> str:
    """['datasets', 0, 'subsets', 1, 'x'] -> 'datasets[0].subsets[1].x'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _level(parent_path: list) -> str:
    keys = [p for p in parent_path if not isinstance(p, int)]
    return {(): "top", ("general",): "general", ("datasets",): "dataset",
            ("datasets", "subsets"): "subset"}.get(tuple(keys), "top")


def _lookup(data: Any, path: list) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe(error: Invalid, data: dict) -> str:
    path = list(error.path)
    where = format_path(path) or "(top level)"
    if error.error_message == "extra keys not allowed" and path:
        key, level = str(path[-1]), _level(path[:-1])
        homes = [_LEVEL_NAMES[lv] for lv, keys in _LEVEL_KEYS.items() if lv != level and key in keys]
        if homes:
            return f"{where}: '{key}' is not allowed in {_LEVEL_NAMES[level]}; it belongs in {' or '.join(homes)}"
        close = difflib.get_close_matches(key, sorted(_LEVEL_KEYS[level]), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{where}: unknown key '{key}'{hint}"
    value = _lookup(data, path)
    return f"{where}: {error.error_message} (got {value!r})"


def validate_config(data: Any, source: str) -> dict:
    """Validate a parsed config; raise :class:`DatasetError` listing every problem with its key path."""
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: the dataset config must be a table/object with [general] and [[datasets]]")
    try:
        return CONFIG_SCHEMA(data)
    except MultipleInvalid as e:
        problems = [_describe(err, data) for err in e.errors]
        body = problems[0] if len(problems) == 1 else "".join(f"\n  - {p}" for p in problems)
        raise DatasetError(f"invalid dataset config {source}: {body}") from None
