"""Latent caching: encode every image once with the VAE, in memory or as ``.npz`` next to the image.

Disk cache files are ``<stem>_<WWWW>x<HHHH><suffix>.npz`` (WWWW x HHHH = the ORIGINAL image size,
zero-padded to 4 digits; suffix ``_sd`` for SD 1.x/2.x) holding

* ``latents``: float32 [C, h, w], the raw (unscaled) VAE sample for the image at its bucket size,
* ``original_size``: [w, h]; ``crop_ltrb``: [l, t, r, b] (SAI convention, see ``buckets``),
* ``latents_flipped``: latents of the horizontally flipped image (when flip_aug is on),
* ``alpha_mask``: float32 [H, W] at bucket size (when alpha_mask is on or the subset has a
  ``conditioning_data_dir`` mask; re-cache after editing masks).

FLUX/SD3-style files (``suffixed_keys``, kohya's newer cache strategies) name every key with the
latent size: ``latents_<h>x<w>``, ``original_size_<h>x<w>``, ... (h, w = latent height and width),
so one file can hold several resolutions; writing one resolution keeps the others.

A file is valid when it exists, is newer than its image (and mask), has the keys the subset
needs and ``latents`` has the shape bucket / stride. ``skip_cache_check`` trusts any existing file (existence only), which saves
opening thousands of files on a big dataset. A legacy ``<stem>.npz`` is used when valid; it is
never rewritten. Files are written atomically, so an interrupted caching run leaves no torn file.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from library.data.errors import DatasetError
from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

Encode = Callable[[torch.Tensor], torch.Tensor]
LoadImage = Callable[["ImageInfo"], tuple[torch.Tensor, "torch.Tensor | None"]]  # noqa: F821


def cache_path(image_path: Path, image_size: tuple[int, int], suffix: str = "_sd") -> Path:
    """``<folder>/<stem>_<WWWW>x<HHHH><suffix>.npz`` for an image of original size (w, h)."""
    return image_path.with_name(f"{image_path.stem}_{image_size[0]:04d}x{image_size[1]:04d}{suffix}.npz")


def legacy_cache_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + ".npz")


def key_suffix(latent_hw: tuple[int, int], suffixed: bool) -> str:
    """The key suffix of one resolution in a file: ``_<h>x<w>`` for suffixed files, else empty."""
    return f"_{latent_hw[0]}x{latent_hw[1]}" if suffixed else ""


def is_cache_valid(path: Path, *, latent_hw: tuple[int, int], flip_aug: bool, alpha_mask: bool,
                   skip_check: bool = False, key_suffix: str = "", sources: Iterable[Path | None] = ()) -> bool:
    """Whether ``path`` can be used as is (see the module docstring).

    ``sources`` (the image, its mask): a file edited after the cache was written makes it stale.
    """
    if not path.is_file():
        return False
    if skip_check:
        return True
    written = path.stat().st_mtime
    for source in sources:
        if source is not None and source.is_file() and source.stat().st_mtime > written:
            logger.info("latent cache %s is older than %s; re-encoding", path.name, source)
            return False
    sfx = key_suffix
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            needed = {f"latents{sfx}", *([f"latents_flipped{sfx}"] if flip_aug else []),
                      *([f"alpha_mask{sfx}"] if alpha_mask else [])}
            if not needed <= keys:
                return False
            if tuple(npz[f"latents{sfx}"].shape[-2:]) != tuple(latent_hw):
                return False
            return not flip_aug or tuple(npz[f"latents_flipped{sfx}"].shape[-2:]) == tuple(latent_hw)
    except Exception as e:  # a torn or foreign file: encode again and overwrite
        logger.warning("latent cache %s is unreadable (%s); re-encoding", path, e)
        return False


def read_latents(path: Path, *, flipped: bool, alpha_mask: bool,
                 key_suffix: str = "") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(latents or flipped latents, alpha mask or None) from a cache file; errors name the file."""
    sfx = key_suffix
    try:
        with np.load(path) as npz:
            key = f"latents_flipped{sfx}" if flipped else f"latents{sfx}"
            latents = torch.from_numpy(npz[key]) if key in npz.files else None
            mask_key = f"alpha_mask{sfx}"
            mask = torch.from_numpy(npz[mask_key]) if alpha_mask and mask_key in npz.files else None
    except Exception as e:
        raise DatasetError(f"cannot read latent cache {path}: {e} -- delete it to re-encode") from e
    return latents, mask


def cached_latents(info, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, alpha mask or None) of a cached ImageInfo, in the orientation of the sample."""
    if info.latents is not None:
        lat = info.latents_flipped if flipped else info.latents
        mask = info.cached_alpha_mask
    else:
        lat, mask = read_latents(info.latents_npz, flipped=flipped, alpha_mask=info.subset.uses_masks,
                                 key_suffix=info.latents_key_suffix)
    if lat is None:
        raise DatasetError(f"no flipped latents cached for {info.path}: re-cache with flip_aug on")
    if mask is not None and flipped:
        mask = torch.flip(mask, dims=[1])
    return lat, mask


def write_latents(path: Path, latents: torch.Tensor, *, original_size: tuple[int, int],
                  crop_ltrb: tuple[int, int, int, int], latents_flipped: torch.Tensor | None = None,
                  alpha_mask: torch.Tensor | None = None, key_suffix: str = "") -> None:
    sfx = key_suffix
    arrays = {
        f"latents{sfx}": latents.float().cpu().numpy(),
        f"original_size{sfx}": np.array(original_size),
        f"crop_ltrb{sfx}": np.array(crop_ltrb),
    }
    if latents_flipped is not None:
        arrays[f"latents_flipped{sfx}"] = latents_flipped.float().cpu().numpy()
    if alpha_mask is not None:
        arrays[f"alpha_mask{sfx}"] = alpha_mask.float().cpu().numpy()
    if sfx and path.is_file():
        # Suffixed files hold several resolutions: keep the other ones (not this one's stale keys).
        try:
            with np.load(path) as old:
                for key in old.files:
                    if not key.endswith(sfx) and key not in arrays:
                        arrays[key] = old[key]
        except Exception as e:  # a torn file: start it anew
            logger.warning("latent cache %s is unreadable (%s); rewriting it", path, e)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


@dataclass
class _Job:
    """One encode: an image at one bucket size, shared by every ImageInfo that needs exactly it."""

    infos: list = field(default_factory=list)
    npz: Path | None = None
    key_suffix: str = ""

    @property
    def first(self):
        return self.infos[0]

    @property
    def flip(self) -> bool:
        return any(i.subset.flip_aug for i in self.infos)

    @property
    def alpha(self) -> bool:
        return any(i.subset.uses_masks for i in self.infos)


def _plan(images: Iterable, *, to_disk: bool, cache_suffix: str) -> list[_Job]:
    jobs: dict[tuple, _Job] = {}
    npz_owner: dict[Path, tuple] = {}
    for info in images:
        key = (info.path, info.placement.bucket, info.placement.resized_size)
        job = jobs.setdefault(key, _Job())
        job.infos.append(info)
        if to_disk and job.npz is None:
            path = cache_path(info.path, info.image_size, cache_suffix)
            owner = npz_owner.setdefault(path, key)
            if owner == key:
                job.npz = path
            elif owner[0] != info.path:  # a.png and a.jpg: one cache file name for two images
                logger.warning("%s and %s have the same name stem, so both would be cached in %s; %s is cached "
                               "in memory only: rename one of them (they also share one caption file)",
                               owner[0], info.path, path.name, info.path)
            else:  # one file holds one bucket size: the other sizes stay in memory
                logger.warning("%s is used at buckets %s and %s; the second is cached in memory only",
                               info.path, owner[1], key[1])
    return list(jobs.values())


def missing_jobs(images: list, *, latents_stride: int = 8, to_disk: bool = False, skip_cache_check: bool = False,
                 cache_suffix: str = "_sd", process_index: int = 0, num_processes: int = 1,
                 suffixed_keys: bool = False) -> list[_Job]:
    """Point every image that has a valid cache file at it; return the encodes still to do.

    The arguments are those of :func:`cache_latents`. Nothing is encoded or written here.
    """
    jobs = _plan(images, to_disk=to_disk, cache_suffix=cache_suffix)
    todo: list[_Job] = []
    for n, job in enumerate(jobs):
        info = job.first
        bw, bh = info.placement.bucket
        latent_hw = (bh // latents_stride, bw // latents_stride)
        job.key_suffix = key_suffix(latent_hw, suffixed_keys)
        if job.npz is not None:
            found = None
            candidates = (job.npz,) if suffixed_keys else (job.npz, legacy_cache_path(info.path))
            for candidate in candidates:
                if is_cache_valid(candidate, latent_hw=latent_hw, flip_aug=job.flip, alpha_mask=job.alpha,
                                  skip_check=skip_cache_check, key_suffix=job.key_suffix,
                                  sources=(info.path, *(i.mask_path for i in job.infos if job.alpha))):
                    found = candidate
                    break
            if found is not None:
                for i in job.infos:
                    i.latents_npz, i.latents_key_suffix = found, job.key_suffix
                continue
            if num_processes > 1 and n % num_processes != process_index:
                continue
        todo.append(job)
    return todo


def cache_latents(images: list, encode: Encode, load_image: LoadImage, *, latents_stride: int = 8,
                  vae_batch_size: int = 1, to_disk: bool = False, skip_cache_check: bool = False,
                  cache_suffix: str = "_sd", process_index: int = 0, num_processes: int = 1,
                  suffixed_keys: bool = False) -> int:
    """Fill the latent cache of ``images`` (ImageInfos with placements); returns how many were encoded.

    ``encode(images [B,3,H,W] float in [-1,1]) -> latents [B,C,h,w]`` is the family's VAE encode;
    it receives CPU float32 tensors and moves them where it needs. With ``to_disk`` and several
    processes, this process only encodes the missing files with ``job index % num_processes ==
    process_index``; call again with the defaults after a barrier to pick up all files.
    ``suffixed_keys``: the FLUX/SD3 file layout (keys end in ``_<h>x<w>``; no legacy ``<stem>.npz``).
    """
    todo = missing_jobs(images, latents_stride=latents_stride, to_disk=to_disk, skip_cache_check=skip_cache_check,
                        cache_suffix=cache_suffix, process_index=process_index, num_processes=num_processes,
                        suffixed_keys=suffixed_keys)
    if not todo:
        return 0

    todo.sort(key=lambda j: j.first.placement.bucket)  # a VAE batch needs one image size
    chunks: list[list[_Job]] = []
    for job in todo:
        bucket = job.first.placement.bucket
        if chunks and len(chunks[-1]) < vae_batch_size and chunks[-1][0].first.placement.bucket == bucket:
            chunks[-1].append(job)
        else:
            chunks.append([job])
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for chunk in tqdm(chunks, desc="caching latents", smoothing=0):
            loaded = list(pool.map(lambda job: load_image(job.first), chunk))
            pixels = torch.stack([image for image, _ in loaded])
            latents = encode_checked(encode, pixels, chunk)
            flipped = None
            if any(job.flip for job in chunk):
                flipped = encode_checked(encode, torch.flip(pixels, dims=[3]), chunk)
            for k, (job, (_, mask)) in enumerate(zip(chunk, loaded)):
                store(job, latents[k].clone(), flipped[k].clone() if flipped is not None and job.flip else None,
                       mask if job.alpha else None)
    return len(todo)


def encode_checked(encode: Encode, pixels: torch.Tensor, chunk: list[_Job]) -> torch.Tensor:
    latents = encode(pixels).detach().float().cpu()
    bad = torch.isnan(latents).flatten(1).any(dim=1)
    if bool(bad.any()):
        names = ", ".join(str(job.first.path) for job, b in zip(chunk, bad.tolist()) if b)
        raise DatasetError(f"the VAE produced NaN latents for {names}: check the image(s); "
                           "with fp16 try --no_half_vae")
    return latents


def store(job: _Job, latents: torch.Tensor, latents_flipped: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    info = job.first
    if job.npz is not None:
        write_latents(job.npz, latents, original_size=info.image_size, crop_ltrb=info.crop_ltrb,
                      latents_flipped=latents_flipped, alpha_mask=mask, key_suffix=job.key_suffix)
        for i in job.infos:
            i.latents_npz, i.latents_key_suffix = job.npz, job.key_suffix
        return
    for i in job.infos:
        i.latents, i.latents_flipped, i.cached_alpha_mask = latents, latents_flipped, mask
