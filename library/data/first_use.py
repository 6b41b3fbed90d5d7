"""Latents cached on first use (``--cache_latents_on_first_use``): training starts before the VAE pass.

A plain ``--cache_latents`` encodes every image before the first step, so on a big dataset (or a
slow machine: 29 s for 8 images of the full SD VAE on two CPU cores) the run shows nothing for
minutes. Here the cache is filled by the batches themselves: the first time a batch needs an
image, the trainer encodes it, stores it exactly where ``--cache_latents`` would (memory, or the
``.npz`` next to the image with ``--cache_latents_to_disk``), and every later batch reads it from
there. The first step comes after one batch's encodes; the run as a whole does the same work.

How a batch gets its latents. DataLoader workers hold copies of the dataset, so they cannot see a
cache the main process fills (a persistent worker never does; others see it from the next epoch,
when they start again). A worker therefore sends, for a batch with images it has no cache for,
``latents_to_fill``: the rows of latents it knows, None for the others, and the dataset index.
:meth:`LatentsOnFirstUse.fill` runs in the main process, which owns the cache: it encodes what is
still missing and reads the rest from the cache. No pixels travel; a row the main process already
holds costs a lookup.

Every image's posterior sample is drawn from its own seed (``--seed``, the file name, the bucket),
inside a forked random state. So a latent does not depend on which batch first needed it, a
``--resume`` re-encodes the same latents, and the training's own random stream is untouched.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable

import torch

from library.data import latent_cache

logger = logging.getLogger(__name__)


def posterior_seed(seed: int, info, variant: str) -> int:
    """The seed of one image's VAE posterior sample; ``variant`` is ``"latents"`` or ``"flipped"``."""
    text = f"{seed}:{info.path.name}:{info.image_size}:{info.placement.bucket}:{variant}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


class LatentsOnFirstUse:
    """The main process's side of latent caching on first use (see the module docstring).

    ``encode(pixels [B,3,H,W]) -> raw latents`` is the family's VAE encode; ``on_complete`` runs
    once every image is cached (the trainer moves the VAE off the device). The other arguments are
    those of ``DatasetGroup.cache_latents``. Building it finds the cache files that already exist
    (like a cache pass that encodes nothing) and switches the group's datasets to first-use batches.
    """

    def __init__(self, group, encode: Callable[[torch.Tensor], torch.Tensor], *, seed: int, to_disk: bool = False,
                 skip_cache_check: bool = False, cache_suffix: str = "_sd", suffixed_keys: bool = False,
                 rng_devices: list | None = None, on_complete: Callable[[], None] | None = None):
        group.verify_latents_cacheable()
        self._encode = encode
        self._seed = int(seed)
        self._load = group.latent_image_loader()
        self._rng_devices = rng_devices or []
        self._on_complete = on_complete
        todo = latent_cache.missing_jobs(group.images(), latents_stride=group.latents_stride, to_disk=to_disk,
                                         skip_cache_check=skip_cache_check, cache_suffix=cache_suffix,
                                         suffixed_keys=suffixed_keys)
        self._pending = {id(info): job for job in todo for info in job.infos}
        self._images = {(ds.index, info.image_key, info.placement.bucket): info
                        for ds in group.datasets for info in ds.images}
        self.total = len(todo)
        self.encoded = 0
        for ds in group.datasets:
            ds.latents_on_first_use = True
        where = "on disk" if to_disk else "in memory"
        if todo:
            logger.info("latents are cached on first use (%s): %d image(s) to encode as batches need them",
                        where, len(todo))
        else:
            self._finish()

    @property
    def complete(self) -> bool:
        return not self._pending

    def fill(self, batch: dict) -> dict:
        """``batch`` with ``latents`` (and the masks of the filled rows) in place of ``latents_to_fill``."""
        rows = batch.get("latents_to_fill")
        if rows is None:
            return batch
        dataset = int(rows["dataset"])
        masks = batch.get("alpha_masks")
        known = [r for r in rows["latents"] if r is not None]
        device = known[0].device if known else (masks.device if masks is not None else torch.device("cpu"))
        latents = []
        for k, row in enumerate(rows["latents"]):
            if row is None:
                hw = tuple(int(v) for v in batch["target_sizes_hw"][k])
                info = self._images[(dataset, batch["image_keys"][k], (hw[1], hw[0]))]
                job = self._pending.get(id(info))
                if job is not None:
                    self._encode_job(job)
                row, mask = latent_cache.cached_latents(info, batch["flippeds"][k])
                if masks is not None and mask is not None:
                    masks[k] = mask.to(masks.device)
            latents.append(row.to(device))
        return {**batch, "latents": torch.stack(latents), "latents_to_fill": None}

    def _encode_job(self, job) -> None:
        pixels, mask = self._load(job.first)
        pixels = pixels[None]
        with torch.no_grad(), torch.random.fork_rng(devices=self._rng_devices):
            torch.manual_seed(posterior_seed(self._seed, job.first, "latents"))
            latents = latent_cache.encode_checked(self._encode, pixels, [job])[0]
            flipped = None
            if job.flip:
                torch.manual_seed(posterior_seed(self._seed, job.first, "flipped"))
                flipped = latent_cache.encode_checked(self._encode, torch.flip(pixels, dims=[3]), [job])[0]
        latent_cache.store(job, latents, flipped, mask if job.alpha else None)
        for info in job.infos:
            self._pending.pop(id(info), None)
        self.encoded += 1
        if not self._pending:
            self._finish()

    def _finish(self) -> None:
        if self.encoded:
            logger.info("all latents are cached: %d image(s) encoded on first use", self.encoded)
        if self._on_complete is not None:
            self._on_complete()
