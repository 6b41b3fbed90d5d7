"""The dataset part of the ``ss_*`` safetensors metadata.

Values are strings; structured values are JSON (``json.dumps`` defaults, as readers such as the
A1111 additional-networks extension expect). Two layouts, as the reference writes them:

* with ``--dataset_config``: ``ss_datasets`` (one JSON object per dataset with its subsets),
  ``ss_tag_frequency`` and ``ss_dataset_dirs``;
* otherwise (CLI-only folders): flat keys from the flags and the single dataset --
  ``ss_batch_size_per_device``, ``ss_total_batch_size``, ``ss_resolution`` ("(W, H)"),
  augmentation and bucket flags, ``ss_dataset_dirs``/``ss_reg_dataset_dirs``
  (``{"10_sks": {"n_repeats": 10, "img_count": 8}}``), ``ss_tag_frequency``, ``ss_bucket_info``.
"""

from __future__ import annotations

import json
from typing import Any


def _dirs_entry(subset) -> dict[str, int]:
    return {"n_repeats": subset.params.num_repeats, "img_count": subset.img_count}


def _unique(name: str, taken: dict) -> str:
    """``name``, or ``name (2)``, ``name (3)`` ... when already used (same folder in two datasets)."""
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} ({n})", n + 1
    return candidate


def _subset_metadata(subset, is_dreambooth: bool) -> tuple[dict[str, Any], str | None]:
    p = subset.params
    md: dict[str, Any] = {
        "img_count": subset.img_count,
        "num_repeats": p.num_repeats,
        "color_aug": bool(p.color_aug),
        "flip_aug": bool(p.flip_aug),
        "random_crop": bool(p.random_crop),
        "shuffle_caption": bool(p.shuffle_caption),
        "keep_tokens": p.keep_tokens,
        "keep_tokens_separator": p.keep_tokens_separator,
        "secondary_separator": p.secondary_separator,
        "enable_wildcard": bool(p.enable_wildcard),
        "caption_prefix": p.caption_prefix,
        "caption_suffix": p.caption_suffix,
    }
    dir_name = None
    if p.image_dir is not None:
        md["image_dir"] = dir_name = p.image_dir.name
    if is_dreambooth:
        md["class_tokens"] = p.class_tokens
        md["is_reg"] = p.is_reg
        if p.is_reg:
            dir_name = None  # regularization folders are not listed in ss_dataset_dirs
    else:
        md["metadata_file"] = dir_name = p.metadata_file.name
    return md, dir_name


def _config_metadata(group) -> dict[str, str]:
    datasets: list[dict[str, Any]] = []
    dirs: dict[str, dict[str, int]] = {}
    for ds in group.datasets:
        p = ds.params
        subsets = []
        for subset in ds.subsets:
            md, dir_name = _subset_metadata(subset, p.is_dreambooth)
            subsets.append(md)
            if dir_name is not None:
                dirs[_unique(dir_name, dirs)] = _dirs_entry(subset)
        datasets.append({
            "is_dreambooth": p.is_dreambooth,
            "batch_size_per_device": p.batch_size,
            "num_train_images": ds.num_train_images,
            "num_reg_images": ds.num_reg_images,
            "resolution": list(p.resolution),
            "enable_bucket": bool(p.enable_bucket),
            "min_bucket_reso": p.min_bucket_reso if p.enable_bucket else None,
            "max_bucket_reso": p.max_bucket_reso if p.enable_bucket else None,
            "tag_frequency": ds.tag_frequency(),
            "bucket_info": ds.bucket_info(),
            "subsets": subsets,
        })
    return {
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(group.tag_frequency()),
        "ss_dataset_dirs": json.dumps(dirs),
    }


def _flat_metadata(group, args, num_processes: int, gradient_accumulation_steps: int) -> dict[str, str]:
    ds = group.datasets[0]
    p = ds.params
    dirs = {s.params.name: _dirs_entry(s) for s in ds.subsets if not s.params.is_reg}
    reg_dirs = {s.params.name: _dirs_entry(s) for s in ds.subsets if s.params.is_reg}
    batch_size = p.batch_size
    values: dict[str, Any] = {
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * num_processes * gradient_accumulation_steps,
        "ss_resolution": tuple(p.resolution),
        "ss_color_aug": bool(getattr(args, "color_aug", False)),
        "ss_flip_aug": bool(getattr(args, "flip_aug", False)),
        "ss_random_crop": bool(getattr(args, "random_crop", False)),
        "ss_shuffle_caption": bool(getattr(args, "shuffle_caption", False)),
        "ss_enable_bucket": bool(p.enable_bucket),
        "ss_bucket_no_upscale": bool(p.enable_bucket and p.bucket_no_upscale),
        "ss_min_bucket_reso": p.min_bucket_reso if p.enable_bucket else None,
        "ss_max_bucket_reso": p.max_bucket_reso if p.enable_bucket else None,
        "ss_keep_tokens": getattr(args, "keep_tokens", 0),
    }
    out = {key: str(value) for key, value in values.items()}
    out["ss_dataset_dirs"] = json.dumps(dirs)
    out["ss_reg_dataset_dirs"] = json.dumps(reg_dirs)
    out["ss_tag_frequency"] = json.dumps(ds.tag_frequency())
    out["ss_bucket_info"] = json.dumps(ds.bucket_info())
    return out


def dataset_metadata(group, args, *, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> dict[str, str]:
    """The dataset ``ss_*`` keys for ``group`` (layout chosen by how the group was configured)."""
    if not group.datasets:
        return {}
    if group.from_config:
        return _config_metadata(group)
    return _flat_metadata(group, args, num_processes, gradient_accumulation_steps)
