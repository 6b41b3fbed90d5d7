"""Assign every image of a metadata JSON to a bucket and cache its VAE latents as ``<stem>.npz``.

    python finetune/prepare_buckets_latents.py train_data meta_clean.json meta_lat.json model.safetensors \
        --max_resolution 512,512 --batch_size 4 --flip_aug --skip_existing

Same positional arguments and flags as kohya-ss/sd-scripts (docs/finetune_metadata.md). For each
image of ``train_data_dir`` that has an entry in ``in_json`` (keys as the merge scripts write them:
``--full_path``, ``--recursive``):

1. the bucket is chosen by the trainer's bucketing (``library.data.buckets.BucketPlanner`` with
   ``--max_resolution`` as the resolution and ``--min/max_bucket_reso``, ``--bucket_reso_steps``,
   ``--bucket_no_upscale``), from the size in the file header;
2. the image is resized and centre-cropped to the bucket exactly as the dataset does it
   (``library.data.images``), encoded with the model's VAE (a sample of the posterior, unscaled:
   what the trainer's latent cache stores) and written next to the image as ``<stem>.npz`` with
   ``latents``, ``original_size``, ``crop_ltrb`` (+ ``latents_flipped`` with ``--flip_aug``,
   ``alpha_mask`` with ``--alpha_mask``) through ``library.data.latent_cache.write_latents``;
3. ``train_resolution: [w, h]`` (the bucket, floored to multiples of 8) is added to the entry, and
   the metadata is written to ``out_json``.

``--skip_existing`` keeps every ``<stem>.npz`` that is already valid for the image's bucket and
flags (``latent_cache.is_cache_valid``: the arrays needed, latents of bucket / 8): it is neither
re-encoded nor rewritten, and the VAE is not even loaded when nothing is left to encode. (The
reference's ``--skip_existing`` crashes.) Training with the same resolution and bucket flags and
``--cache_latents_to_disk`` reads these files instead of encoding.

Only the VAE is loaded from ``model_name_or_path`` (an SD single file or Diffusers folder);
``--v2`` is accepted for compatibility and changes nothing (SD 1.x and 2.x share the VAE).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if __package__ in (None, ""):  # run as a script (python finetune/...): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from finetune.metadata_io import Metadata, keyed_images, listing, read_metadata, write_metadata  # noqa: E402
from library.args import add_logging_arguments  # noqa: E402  (torch-free: --help stays instant)
from library.log import setup_logging  # noqa: E402

if TYPE_CHECKING:
    import torch

    from library.data.buckets import BucketPlanner, Placement

logger = logging.getLogger(__name__)

LATENTS_STRIDE = 8  # the SD / SDXL VAE: the only latent layout of the legacy <stem>.npz files
MIXED_PRECISIONS = ("no", "fp16", "bf16")
_PREFETCH_BATCHES = 2  # batches loaded ahead of the VAE when loader threads are used

Size = tuple[int, int]


class FlagError(ValueError):
    """A flag value that cannot work (the message names the flag and a working value)."""


# ----------------------------------------------------------------------------------- flags


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Bucket the images of a metadata JSON and cache their latents "
                                                 "as <stem>.npz.")
    parser.add_argument("train_data_dir", type=str, help="folder holding the images")
    parser.add_argument("in_json", type=str, help="metadata JSON to read (from the merge / clean scripts)")
    parser.add_argument("out_json", type=str, help="metadata JSON to write, with train_resolution per image")
    parser.add_argument("model_name_or_path", type=str,
                        help="SD checkpoint (.safetensors/.ckpt) or Diffusers folder whose VAE encodes the images")
    parser.add_argument("--v2", action="store_true",
                        help="the model is SD 2.x (accepted for compatibility; the VAE is the same)")
    parser.add_argument("--batch_size", type=int, default=1, help="images encoded at once (default 1)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="threads loading images while the VAE encodes (default: load in the main thread)")
    parser.add_argument("--max_resolution", type=str, default="512,512",
                        help="training resolution 'width,height' (or one number for a square); default 512,512")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    parser.add_argument("--bucket_reso_steps", type=int, default=64,
                        help="bucket sides are multiples of this (a multiple of 8; default 64)")
    parser.add_argument("--bucket_no_upscale", action="store_true",
                        help="never enlarge an image: bucket = its size (shrunk to the max area) floored to steps")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=MIXED_PRECISIONS,
                        help="VAE precision (default no = float32)")
    parser.add_argument("--full_path", action="store_true",
                        help="the metadata keys are absolute image paths (merge scripts' --full_path)")
    parser.add_argument("--flip_aug", action="store_true",
                        help="also cache the latents of the horizontally flipped image (latents_flipped)")
    parser.add_argument("--alpha_mask", action="store_true",
                        help="load the alpha channel and store it as alpha_mask (for --alpha_mask training)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="keep <stem>.npz files already valid for the image's bucket and flags")
    parser.add_argument("--recursive", action="store_true",
                        help="also take images in sub-folders (keys as the merge scripts' --recursive)")
    add_logging_arguments(parser)
    return parser


def parse_max_resolution(text: str) -> Size:
    """``"512,512"`` -> (512, 512); ``"768"`` -> (768, 768). Raises :class:`FlagError` saying what to write."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise FlagError(f"--max_resolution {text!r}: write 'width,height' (e.g. 512,512) or one number")
    return values[0], values[1]


# --------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class BucketSettings:
    """The bucketing flags; :meth:`planner` applies them exactly as the training dataset does."""

    max_resolution: Size = (512, 512)
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def planner(self) -> BucketPlanner:
        """A :class:`BucketPlanner`; raises :class:`FlagError` for settings training would refuse."""
        from library.data.buckets import BucketPlanner, adjust_bucket_limits

        steps = self.bucket_reso_steps
        if steps < LATENTS_STRIDE or steps % LATENTS_STRIDE:
            raise FlagError(f"--bucket_reso_steps {steps} must be a multiple of {LATENTS_STRIDE} (the VAE's "
                             "latent stride): use e.g. 64")
        min_reso, max_reso = adjust_bucket_limits(self.min_bucket_reso, self.max_bucket_reso, steps)
        w, h = self.max_resolution
        if not self.bucket_no_upscale and (min(w, h) < min_reso or max(w, h) > max_reso):
            raise FlagError(f"--max_resolution {w},{h} is outside --min_bucket_reso {min_reso} .. --max_bucket_reso "
                             f"{max_reso}: widen the bucket range or change the resolution")
        if self.bucket_no_upscale:
            logger.info("--bucket_no_upscale: --min_bucket_reso and --max_bucket_reso are not used")
        return BucketPlanner(self.max_resolution, enable_bucket=True, min_reso=min_reso, max_reso=max_reso,
                             steps=steps, no_upscale=self.bucket_no_upscale)


@dataclass
class PlannedImage:
    """One image to cache: its metadata key, file, original size, bucket placement and npz path."""

    key: str
    path: Path
    image_size: Size
    placement: Placement

    @property
    def bucket(self) -> Size:
        return self.placement.bucket

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.bucket[1] // LATENTS_STRIDE, self.bucket[0] // LATENTS_STRIDE

    @property
    def npz(self) -> Path:
        from library.data.latent_cache import legacy_cache_path

        return legacy_cache_path(self.path)

    @property
    def crop_ltrb(self) -> tuple[int, int, int, int]:
        from library.data.buckets import sai_crop_ltrb

        return sai_crop_ltrb(self.bucket, self.image_size)


def train_resolution(bucket: Size) -> list[int]:
    """The ``train_resolution`` recorded for a bucket: [w, h] floored to multiples of 8, as the reference does."""
    return [bucket[0] - bucket[0] % LATENTS_STRIDE, bucket[1] - bucket[1] % LATENTS_STRIDE]


def plan_images(images: dict[str, Path], metadata: Metadata,
                planner: BucketPlanner) -> tuple[list[PlannedImage], list[str]]:
    """(the images with a metadata entry, placed in buckets; the keys of images without an entry).

    Sizes come from the file headers, so a corrupt image is reported (naming it) before the VAE loads.
    Two images that would share one ``<stem>.npz`` (``a.png`` and ``a.jpg`` keyed by full path) are
    a :class:`DatasetError`.
    """
    from tqdm import tqdm

    from library.data.errors import DatasetError
    from library.data.images import read_image_size
    from library.data.latent_cache import legacy_cache_path

    planned: list[PlannedImage] = []
    not_in_metadata: list[str] = []
    npz_owner: dict[Path, Path] = {}
    for key, path in tqdm(images.items(), desc="reading image sizes", unit="image", disable=len(images) < 100):
        if key not in metadata:
            not_in_metadata.append(key)
            continue
        npz = legacy_cache_path(path)
        owner = npz_owner.setdefault(npz, path)
        if owner != path:
            raise DatasetError(f"{owner} and {path} would both be cached as {npz}: rename one of them")
        size = read_image_size(path)
        planned.append(PlannedImage(key, path, size, planner.place(size, name=str(path))))
    return planned, not_in_metadata


def batches_by_bucket(items: Sequence[PlannedImage], batch_size: int) -> list[list[PlannedImage]]:
    """Batches of up to ``batch_size`` images of one bucket (a VAE batch needs one size), buckets in order."""
    by_bucket: dict[Size, list[PlannedImage]] = {}
    for item in items:
        by_bucket.setdefault(item.bucket, []).append(item)
    batches: list[list[PlannedImage]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


# ---------------------------------------------------------------------------------- encoding


def load_for_encoding(item: PlannedImage, *, alpha_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image at its bucket size as the training dataset makes it: [3,H,W] in [-1,1], and the alpha mask.

    Same steps as ``BucketedDataset.load_sample_image`` without augmentation: decode (RGBA with
    ``alpha_mask``), resize to the placement's size (area when shrinking, Lanczos when enlarging),
    centre crop to the bucket, split off the alpha channel ([H,W] float in [0,1]).
    """
    import numpy as np
    import torch

    from library.data.errors import DatasetError
    from library.data.images import crop_image, load_image, resize_image, split_alpha, to_tensor

    image = load_image(item.path, with_alpha=alpha_mask)
    if (image.shape[1], image.shape[0]) != tuple(item.image_size):
        raise DatasetError(f"image {item.path} is {image.shape[1]}x{image.shape[0]} but its header says "
                           f"{item.image_size[0]}x{item.image_size[1]}: re-save the image")
    image = resize_image(image, item.placement.resized_size)
    left, top = item.placement.crop_offset()
    image, alpha = split_alpha(crop_image(image, left, top, *item.bucket))
    mask = torch.from_numpy(np.ascontiguousarray(alpha)) if alpha is not None else None
    return to_tensor(image), mask


def loaded_batches(batches: Sequence[list[PlannedImage]], load: Callable[[PlannedImage], tuple],
                   workers: int | None) -> Iterator[tuple[list[PlannedImage], list[tuple]]]:
    """Yield (batch, loaded images); with ``workers`` threads the next batches load while one is encoded.

    At most ``_PREFETCH_BATCHES`` batches are held ahead, so memory stays bounded on big datasets.
    """
    if not workers or workers < 1:
        for batch in batches:
            yield batch, [load(item) for item in batch]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[list[PlannedImage], list[Future]]] = deque()
        upcoming = iter(batches)

        def submit_next() -> None:
            batch = next(upcoming, None)
            if batch is not None:
                pending.append((batch, [pool.submit(load, item) for item in batch]))

        for _ in range(_PREFETCH_BATCHES):
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            submit_next()
            yield batch, [f.result() for f in futures]


def vae_encoder(vae, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(pixels [B,3,H,W] in [-1,1]) -> latents [B,4,h,w]`` float32 on the CPU: a posterior sample,
    unscaled -- what the SD family's ``encode_images`` gives the trainer's latent cache."""
    import torch

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.sample().float().cpu()

    return encode


def _checked(latents: torch.Tensor, batch: list[PlannedImage], mixed_precision: str) -> torch.Tensor:
    import torch

    from library.data.errors import DatasetError

    bad = torch.isnan(latents).flatten(1).any(dim=1)
    if bool(bad.any()):
        names = ", ".join(str(item.path) for item, b in zip(batch, bad.tolist()) if b)
        hint = " (try --mixed_precision no)" if mixed_precision != "no" else ""
        raise DatasetError(f"the VAE produced NaN latents for {names}: check the image(s){hint}")
    return latents


def encode_and_write(todo: Sequence[PlannedImage], encode: Callable[[torch.Tensor], torch.Tensor], *,
                     batch_size: int = 1, workers: int | None = None, flip_aug: bool = False,
                     alpha_mask: bool = False, mixed_precision: str = "no") -> list[str]:
    """Encode ``todo`` in batches of one bucket and write each ``<stem>.npz``; returns the keys written."""
    import torch
    from tqdm import tqdm

    from library.data.latent_cache import write_latents

    def load(item: PlannedImage):
        return load_for_encoding(item, alpha_mask=alpha_mask)

    written: list[str] = []
    with tqdm(total=len(todo), desc="encoding latents", unit="image", smoothing=0) as progress:
        for batch, loaded in loaded_batches(batches_by_bucket(todo, batch_size), load, workers):
            pixels = torch.stack([image for image, _ in loaded])
            latents = _checked(encode(pixels), batch, mixed_precision)
            flipped = _checked(encode(torch.flip(pixels, dims=[3])), batch, mixed_precision) if flip_aug else None
            for k, (item, (_, mask)) in enumerate(zip(batch, loaded)):
                write_latents(item.npz, latents[k], original_size=item.image_size, crop_ltrb=item.crop_ltrb,
                              latents_flipped=flipped[k] if flipped is not None else None,
                              alpha_mask=mask if alpha_mask else None)
                written.append(item.key)
            progress.update(len(batch))
    return written


@dataclass
class PrepareReport:
    """What a run did, by metadata key, and how many images went to each bucket."""

    encoded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # --skip_existing: a valid npz was kept
    not_in_metadata: list[str] = field(default_factory=list)
    bucket_counts: dict[Size, int] = field(default_factory=dict)


def _load_encoder(model_name_or_path: str, mixed_precision: str, device: str | None):
    import torch

    from library.families.sd.loading import load_vae

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae, _ = load_vae(model_name_or_path, dtype=dtype, device=device)
    vae.requires_grad_(False)
    logger.info("VAE of %s loaded (%s, %s)", model_name_or_path, device, dtype)
    return vae_encoder(vae, device)


def prepare_buckets_latents(train_data_dir: str | Path, in_json: str | Path, out_json: str | Path,
                            model_name_or_path: str, *, v2: bool = False, batch_size: int = 1,
                            max_data_loader_n_workers: int | None = None, buckets: BucketSettings = BucketSettings(),
                            mixed_precision: str = "no", full_path: bool = False, flip_aug: bool = False,
                            alpha_mask: bool = False, skip_existing: bool = False, recursive: bool = False,
                            device: str | None = None) -> PrepareReport:
    """The whole script (see the module docstring); returns what it did.

    Everything that can be checked without the VAE (flags, folder, metadata, image headers) is
    checked before it loads. ``out_json`` is written last; if the run stops early, the ``.npz``
    files written so far are complete (atomic writes) and ``--skip_existing`` resumes.
    Raises :class:`FlagError` for bad settings, :class:`DatasetError` for bad data.
    """
    from tqdm import tqdm

    from library.data import latent_cache

    from library.training.validation import check_writable_file

    del v2  # accepted for compatibility: SD 1.x and 2.x share the VAE architecture and latent format
    check_writable_file(str(out_json), "out_json")  # written last, after the VAE pass: check it first
    if batch_size < 1:
        raise FlagError(f"--batch_size must be >= 1 (got {batch_size})")
    if mixed_precision not in MIXED_PRECISIONS:
        raise FlagError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}")
    planner = buckets.planner()
    if not Path(model_name_or_path).exists():
        raise FileNotFoundError(f"model_name_or_path {model_name_or_path} does not exist: give a local SD "
                                ".safetensors/.ckpt file or Diffusers folder (nothing is downloaded)")
    metadata = read_metadata(Path(in_json))
    images = keyed_images(Path(train_data_dir), full_path=full_path, recursive=recursive)
    planned, not_in_metadata = plan_images(images, metadata, planner)
    report = PrepareReport(not_in_metadata=not_in_metadata,
                           bucket_counts=dict(sorted(Counter(item.bucket for item in planned).items())))
    if not_in_metadata:
        logger.warning("%d image(s) have no entry in %s and are skipped%s: %s", len(not_in_metadata), in_json,
                       "" if full_path else " (keys written with --full_path need --full_path here too)",
                       listing(not_in_metadata))
    if not planned:
        logger.warning("no image of %s is listed in %s: nothing to cache", train_data_dir, in_json)

    todo: list[PlannedImage] = []
    for item in tqdm(planned, desc="checking .npz files", unit="image",
                     disable=not skip_existing or len(planned) < 100):
        if skip_existing and latent_cache.is_cache_valid(item.npz, latent_hw=item.latent_hw, flip_aug=flip_aug,
                                                         alpha_mask=alpha_mask):
            report.skipped.append(item.key)
        else:
            todo.append(item)
    if report.skipped:
        logger.info("--skip_existing: %d valid .npz file(s) kept", len(report.skipped))

    if todo:
        encode = _load_encoder(model_name_or_path, mixed_precision, device)
        report.encoded = encode_and_write(todo, encode, batch_size=batch_size, workers=max_data_loader_n_workers,
                                          flip_aug=flip_aug, alpha_mask=alpha_mask, mixed_precision=mixed_precision)

    for item in planned:
        metadata[item.key]["train_resolution"] = train_resolution(item.bucket)
    write_metadata(Path(out_json), metadata)
    for bucket, count in report.bucket_counts.items():
        logger.info("bucket %dx%d: %d image(s)", bucket[0], bucket[1], count)
    if planned:
        mean_error = sum(item.placement.ar_error for item in planned) / len(planned)
        logger.info("mean aspect-ratio error: %.4f", mean_error)
    logger.info("%d image(s) encoded, %d kept (--skip_existing), %d not in the metadata", len(report.encoded),
                len(report.skipped), len(report.not_in_metadata))
    return report


def run(args: argparse.Namespace) -> PrepareReport:
    """:func:`prepare_buckets_latents` from parsed flags."""
    buckets = BucketSettings(max_resolution=parse_max_resolution(args.max_resolution),
                             min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                             bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale)
    return prepare_buckets_latents(args.train_data_dir, args.in_json, args.out_json, args.model_name_or_path,
                                   v2=args.v2, batch_size=args.batch_size,
                                   max_data_loader_n_workers=args.max_data_loader_n_workers, buckets=buckets,
                                   mixed_precision=args.mixed_precision, full_path=args.full_path,
                                   flip_aug=args.flip_aug, alpha_mask=args.alpha_mask,
                                   skip_existing=args.skip_existing, recursive=args.recursive)


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    from library.data.errors import DatasetError
    from library.families.sd.checkpoint import CheckpointError

    try:
        run(args)
    except (DatasetError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except FlagError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
