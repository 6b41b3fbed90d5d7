"""The dataset group: what the trainer's DataLoader iterates.

Item ``i`` of a :class:`DatasetGroup` is a whole batch (datasets concatenated in order). Use it
with ``DataLoader(group, batch_size=1, collate_fn=collate_batch)``; the sampler decides the order.
An item may also be requested as ``(index, step)`` so that token warmup sees the step the batch is
trained at rather than the step the trainer was at when a worker prefetched it.
"""

from __future__ import annotations

import bisect
import logging
import random
from typing import Any, Callable, Mapping

import torch

from library.data import latent_cache, te_cache
from library.data.captions import TrainingPosition
from library.data.collate import FollowsTrainingProgress, TrainingProgress
from library.data.errors import DatasetError
from library.data.metadata import dataset_metadata

logger = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], torch.Tensor]


class DatasetGroup(FollowsTrainingProgress, torch.utils.data.Dataset):
    """Concatenation of :class:`~library.data.dataset.BucketedDataset`; items are batch dicts.

    ``seed`` fixes every random choice of the data pipeline together with the epoch; it is stored
    so DataLoader workers agree. ``tokenize`` (optional) turns the batch's captions into
    ``input_ids`` inside the worker; it must be picklable for spawn-based workers.
    """

    def __init__(self, datasets: list, *, seed: int, prior_loss_weight: float = 1.0, tokenize: Tokenize | None = None,
                 latents_stride: int = 8, from_config: bool = False, max_train_steps: int = 0):
        self.datasets = datasets
        self.seed = int(seed)
        self.prior_loss_weight = float(prior_loss_weight)
        self.tokenize = tokenize
        self.latents_stride = latents_stride
        self.from_config = from_config
        self.progress = TrainingProgress(max_train_steps=max_train_steps)
        self.replacements: dict[str, str] = {}
        self._ends: list[int] = []
        total = 0
        for ds in datasets:
            total += len(ds)
            self._ends.append(total)

    # --------------------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, step = item if isinstance(item, tuple) else (item, self.progress.step)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (the group has {len(self)} batches)")
        d = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[d - 1] if d else 0)
        position = TrainingPosition(epoch=self.progress.epoch, step=step, max_train_steps=self.progress.max_train_steps)
        batch = self.datasets[d].make_batch(local, seed=self.seed, position=position,
                                            prior_loss_weight=self.prior_loss_weight, replacements=self.replacements)
        if self.tokenize is not None:
            batch["input_ids"] = self.tokenize(batch["captions"])
        return batch

    def add_replacement(self, old: str, new: str | list[str]) -> None:
        """Replace ``old`` by ``new`` in every caption (textual inversion token strings); ``old == ""``
        replaces the whole caption, by a random entry of ``new`` when it is a list (TI templates)."""
        self.replacements[old] = new

    # ------------------------------------------------------------------------------ counts
    @property
    def num_train_images(self) -> int:
        """Training images x repeats (regularization images not included)."""
        return sum(ds.num_train_images for ds in self.datasets)

    @property
    def num_reg_images(self) -> int:
        """Regularization images x repeats, before balancing against the training images."""
        return sum(ds.num_reg_images for ds in self.datasets)

    def images(self) -> list:
        return [info for ds in self.datasets for info in ds.images]

    # ------------------------------------------------------------------------------ checks
    def is_latent_cacheable(self) -> bool:
        return all(ds.is_latent_cacheable() for ds in self.datasets)

    def verify_bucket_reso_steps(self, multiple: int) -> None:
        """Raise when a bucketing dataset's bucket_reso_steps, or a fixed-size dataset's resolution, is not
        a multiple of what the model needs (else the first step fails inside the model)."""
        for ds in self.datasets:
            steps = ds.params.bucket_reso_steps
            if ds.params.enable_bucket and steps % multiple:
                raise DatasetError(f"{ds.params.where or 'dataset'}: bucket_reso_steps is {steps} but this model "
                                   f"needs a multiple of {multiple}: set bucket_reso_steps (or --bucket_reso_steps) "
                                   f"to {multiple}")
            width, height = ds.params.resolution
            if not ds.params.enable_bucket and (width % multiple or height % multiple):
                near = max(multiple, round(width / multiple) * multiple)
                raise DatasetError(f"{ds.params.where or 'dataset'}: resolution {width}x{height} is not a multiple "
                                   f"of {multiple}, which this model needs (without bucketing images are trained at "
                                   f"that size): use e.g. --resolution {near} (resolution = {near}), or "
                                   "--enable_bucket")

    def verify_text_encoder_outputs_cacheable(self) -> None:
        """Raise a :class:`DatasetError` naming the subset whose captions vary per sample (shuffle,
        tag/caption dropout, token warmup, wildcards): cached text-encoder outputs would freeze them."""
        for ds in self.datasets:
            reason = ds.text_encoder_uncacheable_reason()
            if reason:
                raise DatasetError(f"text encoder outputs cannot be cached: {reason} (the caption changes between "
                                   "epochs): turn it off, or drop --cache_text_encoder_outputs")

    # ----------------------------------------------------------------------------- caching
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], *, vae_batch_size: int = 1,
                      to_disk: bool = False, skip_cache_check: bool = False, cache_suffix: str = "_sd",
                      process_index: int = 0, num_processes: int = 1, suffixed_keys: bool = False) -> int:
        """Encode every image once (see ``latent_cache.cache_latents``); returns how many were encoded.

        Refused with a :class:`DatasetError` when a subset changes its images every epoch
        (color_aug, random_crop, face_crop_aug_range): cached latents would freeze them.
        """
        self.verify_latents_cacheable()
        if vae_batch_size < 1:
            raise DatasetError(f"--vae_batch_size must be >= 1 (got {vae_batch_size})")
        images, load = self.images(), self.latent_image_loader()
        return latent_cache.cache_latents(images, encode, load, latents_stride=self.latents_stride,
                                          vae_batch_size=vae_batch_size, to_disk=to_disk,
                                          skip_cache_check=skip_cache_check, cache_suffix=cache_suffix,
                                          process_index=process_index, num_processes=num_processes,
                                          suffixed_keys=suffixed_keys)

    def verify_latents_cacheable(self) -> None:
        """Raise a :class:`DatasetError` naming the subset whose images change every epoch."""
        for ds in self.datasets:
            reason = ds.uncacheable_reason()
            if reason:
                raise DatasetError(f"latents cannot be cached: {reason} (the image changes every epoch): "
                                   "turn it off or do not cache latents")

    def latent_image_loader(self) -> Callable:
        """``load(info) -> (pixels [3,H,W] in [-1,1], mask or None)``: the image a cached latent encodes."""
        loaders = {id(info): ds for ds in self.datasets for info in ds.images}

        def load(info):
            return loaders[id(info)].load_sample_image(info, random.Random(0), False)

        return load

    def cache_text_encoder_outputs(self, encode: Callable[[list[str]], Mapping[str, torch.Tensor]], *,
                                   batch_size: int = 1, to_disk: bool = False, skip_cache_check: bool = False,
                                   suffix: str, expected_shapes: te_cache.Shapes | None = None,
                                   process_index: int = 0, num_processes: int = 1,
                                   settings: Mapping[str, bool | float] | None = None) -> int:
        """Encode every image's caption once (see ``te_cache.cache_text_encoder_outputs``); returns how
        many captions were encoded.

        ``encode(captions) -> {name: [B, ...]}``. The caption encoded is the one batches train on
        (prefix/suffix and replacements applied), so replacements must be added before caching.
        ``expected_shapes`` (per-sample shape by name) makes disk files of another shape stale, and
        ``settings`` (flags the outputs depend on, stored in each file) files made with other settings.
        Refused like :meth:`verify_text_encoder_outputs_cacheable` when captions vary.
        """
        self.verify_text_encoder_outputs_cacheable()
        items = [(info, ds.fixed_caption(info, self.replacements)) for ds in self.datasets for info in ds.images]
        return te_cache.cache_text_encoder_outputs(items, encode, batch_size=batch_size, to_disk=to_disk,
                                                   skip_cache_check=skip_cache_check, suffix=suffix,
                                                   expected_shapes=expected_shapes, process_index=process_index,
                                                   num_processes=num_processes, settings=settings)

    # ---------------------------------------------------------------------------- reports
    def bucket_info(self) -> dict[str, Any]:
        """Buckets over all datasets: counts (with repeats) summed per resolution, mean AR error."""
        counts: dict[tuple[int, int], int] = {}
        errors: list[float] = []
        for ds in self.datasets:
            for reso, entry in zip(ds.buckets, ds.bucket_info()["buckets"].values()):
                counts[reso] = counts.get(reso, 0) + entry["count"]
            errors += [info.placement.ar_error for info in ds.images]
        buckets = {str(i): {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for ds in self.datasets:
            for name, freq in ds.tag_frequency().items():
                out.setdefault(name, freq)
        return out

    def metadata(self, args, *, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> dict[str, str]:
        """The dataset part of the ``ss_*`` metadata (all values strings)."""
        return dataset_metadata(self, args, num_processes=num_processes,
                                gradient_accumulation_steps=gradient_accumulation_steps)
