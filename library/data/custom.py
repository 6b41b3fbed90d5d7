"""``--dataset_class pkg.module.Class``: a user-provided dataset in place of the built-in ones.

The class is imported and constructed as ``Class(args, tokenize=tokenize)``. Subclass
:class:`MinimalDataset` and implement ``__len__`` (number of batches) and ``__getitem__(index)``
returning one whole batch dict of the data contract (docs/architecture.md, "Data"): at least
``images`` [B,3,H,W] in [-1,1] (or ``latents``), ``captions``, ``loss_weights`` and, when
``tokenize`` is given, ``input_ids = tokenize(captions)``. The base class supplies the methods the
trainer calls on a dataset group, with neutral defaults (no latent caching, no metadata).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from library.data.collate import FollowsTrainingProgress, TrainingProgress
from library.data.errors import DatasetError


class MinimalDataset(FollowsTrainingProgress, torch.utils.data.Dataset):
    """Base class for ``--dataset_class``; override ``__len__`` and ``__getitem__``."""

    num_train_images: int = 0
    num_reg_images: int = 0

    def __init__(self, args, *, tokenize: Callable[[list[str]], torch.Tensor] | None = None):
        self.args = args
        self.tokenize = tokenize
        self.progress = TrainingProgress(max_train_steps=getattr(args, "max_train_steps", 0) or 0)
        self.datasets: list = []

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError


    def is_latent_cacheable(self) -> bool:
        return False

    def cache_latents(self, encode, **kwargs) -> int:
        raise DatasetError(f"{type(self).__name__} (--dataset_class) does not support latent caching: "
                           "remove --cache_latents / --cache_latents_to_disk")

    def verify_bucket_reso_steps(self, multiple: int) -> None:
        pass

    def bucket_info(self) -> dict[str, Any]:
        return {"buckets": {}, "mean_img_ar_error": 0.0}

    def metadata(self, args, *, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> dict[str, str]:
        return {}


def load_custom_dataset(class_path: str, args, *, tokenize=None):
    """Import ``pkg.module.Class`` and construct it as ``Class(args, tokenize=tokenize)``."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise DatasetError(f"--dataset_class {class_path!r}: give the full path 'package.module.ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DatasetError(f"--dataset_class {class_path}: cannot import module {module_name!r} ({e})") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise DatasetError(f"--dataset_class {class_path}: module {module_name!r} has no {class_name!r}")
    return cls(args, tokenize=tokenize)
