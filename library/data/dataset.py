"""Datasets that yield whole bucketed batches, and the group the trainer iterates.

* :class:`BucketedDataset` is one ``[[datasets]]`` entry: its images (DreamBooth folders or a
  fine-tuning metadata file, regularization images balanced against training images), the bucket
  of every image, and the batches. Batches are formed within a bucket (the last one of a bucket
  may be smaller); which images form which batch is reshuffled every epoch from (seed, epoch).
* :class:`DatasetGroup` concatenates datasets; item ``i`` is batch ``i`` as a dict (see
  :meth:`BucketedDataset.make_batch`). The ORDER of batches is the sampler's business.

Randomness: every per-sample choice (flip, random crop, colour, caption shuffle/dropout/wildcard)
comes from a ``random.Random`` seeded by (seed, epoch, dataset, batch index, position in batch,
purpose), never from global state. The same epoch therefore replays the same batches in any
process and with any number of DataLoader workers, which makes ``--resume`` exact.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from library.data import latent_cache, te_cache
from library.data.buckets import BucketPlanner, adjust_bucket_limits, flipped_crop_left, sai_crop_ltrb
from library.data.captions import TrainingPosition, process_caption, tag_frequency
from library.data.errors import DatasetError
from library.data.images import (color_augment, conditioning_to_tensor, crop_image, face_crop_window,
                                 load_conditioning_image, load_image, load_mask, resize_image, split_alpha, to_tensor)
from library.data.images import IMAGE_EXTENSIONS, unsupported_image_files
from library.data.params import DatasetParams, DreamBoothSubsetParams, FineTuningSubsetParams, SubsetParams
from library.data.subsets import (ImageInfo, ValidationSplit, balance_reg_images, load_dreambooth_subset,
                                  load_fine_tuning_subset)

logger = logging.getLogger(__name__)


def sample_rng(*parts: Any) -> random.Random:
    """A generator determined only by ``parts`` (string seeding hashes with SHA-512: stable everywhere)."""
    return random.Random(":".join(str(p) for p in parts))


@dataclass
class LoadedSubset:
    """A subset as used: its settings, the number of image files and their raw captions' tags."""

    params: SubsetParams
    img_count: int
    tag_frequency: dict[str, int]


@dataclass
class _Sample:
    """One prepared sample before batching (pixels or latents, never both)."""

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    mask: torch.Tensor | None
    conditioning: torch.Tensor | None  # ControlNet conditioning image [3,H,W] in [0,1]
    caption: str
    flipped: bool
    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]

    def alpha_mask(self) -> torch.Tensor:
        """The alpha mask, or an all-ones mask for samples without one (batch with mixed subsets)."""
        return self.mask if self.mask is not None else torch.ones(self.target_hw)


class BucketedDataset:
    """One dataset: images placed in buckets and grouped into batches of ``params.batch_size``."""

    #: set by :class:`~library.data.first_use.LatentsOnFirstUse`: a batch with images not cached yet
    #: carries no pixels but ``latents_to_fill``, the rows of latents known here (None for the others)
    latents_on_first_use = False

    def __init__(self, params: DatasetParams, subsets: list[LoadedSubset], images: list[ImageInfo], *,
                 index: int = 0, num_train_images: int = 0, num_reg_images: int = 0):
        self.params = params
        self.subsets = subsets
        self.images = images
        self.index = index
        self.num_train_images = num_train_images
        self.num_reg_images = num_reg_images
        min_reso, max_reso = adjust_bucket_limits(params.min_bucket_reso, params.max_bucket_reso,
                                                  params.bucket_reso_steps, where=params.where)
        if params.enable_bucket and not params.bucket_no_upscale:
            w, h = params.resolution
            if min(w, h) < min_reso or max(w, h) > max_reso:
                raise DatasetError(f"{params.where}: resolution {w}x{h} is outside min_bucket_reso {min_reso} .. "
                                   f"max_bucket_reso {max_reso}: widen the bucket range or change the resolution")
        self.min_bucket_reso, self.max_bucket_reso = min_reso, max_reso
        planner = BucketPlanner(params.resolution, enable_bucket=params.enable_bucket, min_reso=min_reso,
                                max_reso=max_reso, steps=params.bucket_reso_steps, no_upscale=params.bucket_no_upscale)
        for info in images:
            info.placement = planner.place(info.image_size, name=str(info.path))
            info.crop_ltrb = sai_crop_ltrb(info.placement.bucket, info.image_size)
        by_bucket: dict[tuple[int, int], list[ImageInfo]] = {}
        for info in sorted(images, key=lambda i: i.image_key):
            by_bucket.setdefault(info.placement.bucket, []).append(info)
        self.buckets = sorted(by_bucket)
        self._bucket_images = [by_bucket[b] for b in self.buckets]
        self._batch_map: list[tuple[int, int]] = []
        for b, members in enumerate(self._bucket_images):
            count = sum(info.num_repeats for info in members)
            self._batch_map += [(b, j) for j in range(-(-count // params.batch_size))]
        self._grouping: tuple[tuple[int, int], list[list[list[ImageInfo]]]] | None = None

    def __len__(self) -> int:
        return len(self._batch_map)

    # ------------------------------------------------------------------------------ batching
    def batch_members(self, index: int, *, seed: int, epoch: int) -> list[ImageInfo]:
        """The images of batch ``index`` in ``epoch`` (a repeated image may appear twice)."""
        if self._grouping is None or self._grouping[0] != (seed, epoch):
            grouping = []
            for b, members in enumerate(self._bucket_images):
                items = [info for info in members for _ in range(info.num_repeats)]
                sample_rng(seed, epoch, "bucket", self.index, b).shuffle(items)
                size = self.params.batch_size
                grouping.append([items[i : i + size] for i in range(0, len(items), size)])
            self._grouping = ((seed, epoch), grouping)
        bucket, j = self._batch_map[index]
        return self._grouping[1][bucket][j]

    def make_batch(self, index: int, *, seed: int, position: TrainingPosition, prior_loss_weight: float = 1.0,
                   replacements: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Batch ``index`` as the dict of the data contract (docs/architecture.md, "Data")."""
        members = self.batch_members(index, seed=seed, epoch=position.epoch)
        first_use = self.latents_on_first_use and not all(info.has_cached_latents for info in members)
        if not self.latents_on_first_use and len({info.has_cached_latents for info in members}) > 1:
            raise DatasetError(f"batch {index} mixes images with and without cached latents: "
                               "cache_latents must cover every image")
        if len({info.has_cached_text_encoder_outputs for info in members}) > 1:
            raise DatasetError(f"batch {index} mixes images with and without cached text encoder outputs: "
                               "cache_text_encoder_outputs must cover every image")
        want_masks = any(info.subset.uses_masks for info in members)
        want_conditioning = any(info.conditioning_path is not None for info in members)
        if want_conditioning and not all(info.conditioning_path is not None for info in members):
            raise DatasetError(f"batch {index} mixes images with and without conditioning images: every subset of a "
                               "ControlNet dataset needs conditioning_data_dir")
        samples = [self._make_sample(info, (seed, position.epoch, self.index, index, pos), position, replacements)
                   for pos, info in enumerate(members)]
        cached = members[0].has_cached_latents and not first_use
        te_outputs = None
        if members[0].has_cached_text_encoder_outputs:
            te_outputs = te_cache.batch_outputs(members, [s.caption for s in samples],
                                                where=f"{self.params.where or 'dataset'}, batch {index}")
        return {
            "images": None if cached or first_use else torch.stack([s.pixels for s in samples]),
            "latents": torch.stack([s.latents for s in samples]) if cached else None,
            "captions": [s.caption for s in samples],
            "loss_weights": torch.tensor([prior_loss_weight if i.is_reg else 1.0 for i in members]),
            "alpha_masks": torch.stack([s.alpha_mask() for s in samples]) if want_masks else None,
            "conditioning_images": torch.stack([s.conditioning for s in samples]) if want_conditioning else None,
            "original_sizes_hw": torch.tensor([s.original_hw for s in samples], dtype=torch.long),
            "crop_top_lefts": torch.tensor([s.crop_top_left for s in samples], dtype=torch.long),
            "target_sizes_hw": torch.tensor([s.target_hw for s in samples], dtype=torch.long),
            "flippeds": [s.flipped for s in samples],
            "network_multipliers": torch.full((len(members),), float(self.params.network_multiplier)),
            "custom_attributes": [dict(info.subset.custom_attributes) for info in members],
            "image_keys": [info.image_key for info in members],
            "text_encoder_outputs": te_outputs,
            # first use: LatentsOnFirstUse.fill (main process) encodes the None rows and sets their masks
            "latents_to_fill": {"latents": [s.latents for s in samples], "dataset": self.index} if first_use else None,
        }

    def _make_sample(self, info: ImageInfo, rng_key: tuple, position: TrainingPosition,
                     replacements: Mapping[str, str] | None) -> _Sample:
        # Separate streams for image and caption choices: caching latents (no crop/colour draws)
        # must not change the captions a seed produces.
        image_rng = sample_rng(*rng_key, "image")
        caption_rng = sample_rng(*rng_key, "caption")
        subset = info.subset
        flipped = subset.flip_aug and image_rng.random() < 0.5
        pixels = latents = conditioning = None
        if info.has_cached_latents or self.latents_on_first_use:
            # Without a cache yet (first use), latents and mask stay None: the trainer encodes them.
            latents, mask = latent_cache.cached_latents(info, flipped) if info.has_cached_latents else (None, None)
            if info.conditioning_path is not None:
                conditioning = self._conditioning_image(info, self._crop_window(info, image_rng), flipped)
        else:
            pixels, mask, conditioning = self.load_sample_images(info, image_rng, flipped)
        caption = process_caption(info.caption, subset.caption_options(), caption_rng, position, replacements)
        bucket = info.placement.bucket
        left = flipped_crop_left(bucket, info.crop_ltrb) if flipped else info.crop_ltrb[0]
        return _Sample(pixels=pixels, latents=latents, mask=mask, conditioning=conditioning, caption=caption,
                       flipped=flipped, original_hw=(info.image_size[1], info.image_size[0]),
                       crop_top_left=(info.crop_ltrb[1], left), target_hw=(bucket[1], bucket[0]))

    def load_sample_image(self, info: ImageInfo, rng: random.Random,
                          flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image of ``info`` at its bucket size: [3,H,W] in [-1,1], and the alpha mask [H,W] or None."""
        pixels, mask, _ = self.load_sample_images(info, rng, flipped, with_conditioning=False)
        return pixels, mask

    def _crop_window(self, info: ImageInfo, rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
        """(size (w, h) the image is resized to, (left, top) of the bucket-sized crop): drawn once per sample,
        applied to the image and to its conditioning image alike."""
        subset = info.subset
        if self._face_crop(info):
            return face_crop_window(info.image_size, info.face, info.placement.bucket, subset.face_crop_aug_range,
                                    rng, random_offset=subset.random_crop)
        return info.placement.resized_size, info.placement.crop_offset(rng if subset.random_crop else None)

    def _conditioning_image(self, info: ImageInfo, window, flipped: bool) -> torch.Tensor:
        """The conditioning image of ``info`` resized, cropped and flipped as its image: [3,H,W] in [0,1]."""
        (size, (left, top)), bucket = window, info.placement.bucket
        image = load_conditioning_image(info.conditioning_path, info.image_size)
        image = crop_image(resize_image(image, size, info.subset.resize_interpolation), left, top, *bucket)
        return conditioning_to_tensor(image[:, ::-1] if flipped else image)

    def load_sample_images(self, info: ImageInfo, rng: random.Random, flipped: bool, *, with_conditioning: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`load_sample_image` plus the ControlNet conditioning image [3,H,W] in [0,1] (None when the
        subset has none), which gets exactly the image's resize, crop window and flip (no colour change)."""
        subset = info.subset
        bucket = info.placement.bucket
        if info.mask_path is not None:
            # The mask image becomes the alpha channel (replacing the file's own), so it follows
            # every resize, crop and flip below exactly.
            rgb = load_image(info.path)
            mask = load_mask(info.mask_path, (rgb.shape[1], rgb.shape[0]))
            image = np.concatenate([rgb, mask[..., None]], axis=2)
        else:
            image = load_image(info.path, with_alpha=subset.alpha_mask)
        if image.shape[1] != info.image_size[0] or image.shape[0] != info.image_size[1]:
            raise DatasetError(f"image {info.path} is {image.shape[1]}x{image.shape[0]} but was "
                               f"{info.image_size[0]}x{info.image_size[1]} when the dataset was built "
                               "(changed on disk, or a stale metadata_cache.json: delete it)")
        window = self._crop_window(info, rng)
        size, (left, top) = window
        image = crop_image(resize_image(image, size, subset.resize_interpolation), left, top, *bucket)
        image, alpha = split_alpha(image)
        if subset.color_aug:
            image = color_augment(image, rng)
        if flipped:
            image = image[:, ::-1]
            alpha = alpha[:, ::-1] if alpha is not None else None
        mask = torch.from_numpy(np.ascontiguousarray(alpha)) if alpha is not None else None
        conditioning = None
        if with_conditioning and info.conditioning_path is not None:
            conditioning = self._conditioning_image(info, window, flipped)
        return to_tensor(image), mask, conditioning

    @staticmethod
    def fixed_caption(info: ImageInfo, replacements: Mapping[str, str] | None = None) -> str:
        """The caption :meth:`make_batch` gives ``info`` in every epoch, for a subset whose captions do not
        vary (:meth:`text_encoder_uncacheable_reason` is None): what text-encoder output caching encodes.

        No caption option draws from the generator then, so any seed gives the sampled caption.
        """
        return process_caption(info.caption, info.subset.caption_options(), random.Random(0), TrainingPosition(),
                               replacements)

    def _face_crop(self, info: ImageInfo) -> bool:
        # Face crops apply without bucketing only (with buckets the bucket decides the framing).
        return info.face is not None and info.subset.face_crop_aug_range is not None and not self.params.enable_bucket

    # ------------------------------------------------------------------------------ reports
    def uncacheable_reason(self) -> str | None:
        """Why latents cannot be cached (images change every epoch), naming the subset; or None."""
        for subset in self.subsets:
            p = subset.params
            reason = p.uncacheable_reason(face_crop=not self.params.enable_bucket)
            if reason:
                return f"{p.where}: {reason}"
        return None

    def is_latent_cacheable(self) -> bool:
        return self.uncacheable_reason() is None

    def text_encoder_uncacheable_reason(self) -> str | None:
        """Why text-encoder outputs cannot be cached (captions vary per sample), naming the subset; or None."""
        for subset in self.subsets:
            reason = te_cache.uncacheable_reason(subset.params)
            if reason:
                return f"{subset.params.where}: {reason}"
        return None

    def bucket_info(self) -> dict[str, Any]:
        """``{"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error": e}``.

        Counts include repeats; only buckets holding images are listed, smallest first.
        """
        buckets = {}
        for b, (reso, members) in enumerate(zip(self.buckets, self._bucket_images)):
            buckets[str(b)] = {"resolution": list(reso), "count": sum(i.num_repeats for i in members)}
        errors = [i.placement.ar_error for i in self.images]
        return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for subset in self.subsets:
            out.setdefault(subset.params.name, subset.tag_frequency)
        return out


# ------------------------------------------------------------------------------------ building


def _load_subset(subset: SubsetParams, split: ValidationSplit | None) -> list[ImageInfo]:
    if isinstance(subset, FineTuningSubsetParams):
        return load_fine_tuning_subset(subset, split=split)
    assert isinstance(subset, DreamBoothSubsetParams)
    return load_dreambooth_subset(subset, split=None if subset.is_reg else split)


def _subset_identity(subset: SubsetParams) -> tuple:
    if isinstance(subset, FineTuningSubsetParams):
        return ("ft", subset.metadata_file)
    return ("db", subset.image_dir, subset.is_reg)


def make_dataset(params: DatasetParams, *, index: int, split: ValidationSplit | None = None) -> BucketedDataset:
    """Load the subsets of ``params`` from disk and build the dataset.

    Subsets with ``num_repeats`` < 1 or no images are skipped (warned); a subset repeating another
    one's folder or metadata file in the same dataset is ignored. With a validation ``split`` of
    part "validation", regularization subsets are left out and every repeat count is 1.
    """
    seen: set[tuple] = set()
    loaded: list[LoadedSubset] = []
    train: list[ImageInfo] = []
    reg: list[ImageInfo] = []
    num_train = num_reg = 0
    validation = split is not None and split.part == "validation"
    for subset in params.subsets:
        identity = _subset_identity(subset)
        if identity in seen:
            logger.warning("%s: duplicate of an earlier subset of this dataset (%s); ignored",
                           subset.where, identity[1])
            continue
        seen.add(identity)
        if subset.num_repeats < 1:
            logger.warning("%s: num_repeats is %d; subset skipped", subset.where, subset.num_repeats)
            continue
        if validation and subset.is_reg:
            continue
        infos = _load_subset(subset, split)
        if not infos:
            other = unsupported_image_files(subset.image_dir) if subset.image_dir else []
            why = (f" ({len(other)} file(s) of formats that are not read, e.g. {', '.join(other[:3])}: convert them "
                   f"to {'/'.join(IMAGE_EXTENSIONS)})" if other else "")
            logger.warning("%s: no images in %s%s; subset skipped", subset.where, subset.image_dir or subset.name, why)
            continue
        if validation:
            for info in infos:
                info.num_repeats = 1
        tags = tag_frequency((i.caption for i in infos), subset.caption_separator)
        loaded.append(LoadedSubset(subset, len(infos), tags))
        if subset.is_reg:
            reg += infos
            num_reg += sum(i.num_repeats for i in infos)
        else:
            train += infos
            num_train += sum(i.num_repeats for i in infos)
    if reg and not train:
        logger.warning("%s: regularization images but no training images; nothing to train on", params.where)
    images = train + balance_reg_images(train, reg)
    dataset = BucketedDataset(params, loaded, images, index=index, num_train_images=num_train, num_reg_images=num_reg)
    logger.info("%s: %d training images (with repeats), %d regularization images, %d batches of up to %d",
                params.where or f"dataset {index}", num_train, num_reg, len(dataset), params.batch_size)
    for b, (reso, members) in enumerate(zip(dataset.buckets, dataset._bucket_images)):
        logger.info("  bucket %d: resolution %s, count %d", b, reso, sum(i.num_repeats for i in members))
    return dataset


from library.data.debug import debug_dataset  # noqa: E402  (re-exported: the trainer imports it from here)
from library.data.group import DatasetGroup  # noqa: E402,F401  (re-exported)

__all__ = ["BucketedDataset", "DatasetGroup", "ImageInfo", "LoadedSubset", "make_dataset", "debug_dataset",
           "sample_rng"]
