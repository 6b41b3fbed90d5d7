"""Aspect-ratio buckets: the list of bucket sizes, and where each image goes.

Every image trains at the size of its *bucket*; a batch only holds images of one bucket.

* Predefined buckets (``enable_bucket`` without ``bucket_no_upscale``): for the area A of
  ``resolution``, the square (floor(sqrt(A)/steps)*steps)^2, plus for every width from
  ``min_bucket_reso`` to ``max_bucket_reso`` in ``bucket_reso_steps`` the largest height that keeps
  the area within A (a multiple of steps, at most max), as (w, h) and (h, w) when h >= min.
  An image whose size is a bucket uses it as is; otherwise it goes to the bucket with the nearest
  aspect ratio, is resized so it covers the bucket (scaled by the limiting side) and cropped.
* ``bucket_no_upscale``: images larger than A are scaled down to area A (one side floored to a
  multiple of steps, whichever side keeps the aspect ratio better); the bucket is the (resized) size
  floored to multiples of steps, the remainder cropped. No upscaling, no padding; min/max unused.
* Without bucketing there is one bucket, ``resolution``; images are resized to cover it and cropped.

``crop_ltrb`` follows the SDXL (SAI) convention: the letterbox position of the original aspect
ratio fitted inside the bucket, not the pixels actually cropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from library.data.errors import DatasetError

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """The predefined bucket list for ``max_reso`` (sorted, unique); see the module docstring."""
    area = max_reso[0] * max_reso[1]
    side = math.isqrt(area) // divisible * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, area // width // divisible * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def adjust_bucket_limits(min_reso: int, max_reso: int, steps: int, *, where: str = "") -> tuple[int, int]:
    """Floor min/max bucket sides to multiples of ``steps`` (warning when changed); min stays >= steps."""
    new_min = max(steps, min_reso - min_reso % steps)
    new_max = max(new_min, max_reso - max_reso % steps)
    if (new_min, new_max) != (min_reso, max_reso):
        logger.warning("%smin/max_bucket_reso %d/%d adjusted to multiples of bucket_reso_steps %d: %d/%d",
                       f"{where}: " if where else "", min_reso, max_reso, steps, new_min, new_max)
    return new_min, new_max


def sai_crop_ltrb(bucket: Size, image_size: Size) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image's aspect ratio fitted and centred inside ``bucket``."""
    bw, bh = bucket
    image_ar = image_size[0] / image_size[1]
    if bw / bh > image_ar:
        fitted_w, fitted_h = bh * image_ar, float(bh)
    else:
        fitted_w, fitted_h = float(bw), bw / image_ar
    left, top = int((bw - fitted_w) // 2), int((bh - fitted_h) // 2)
    return left, top, int(round(left + fitted_w)), int(round(top + fitted_h))


def flipped_crop_left(bucket: Size, crop_ltrb: tuple[int, int, int, int]) -> int:
    """crop-left of a horizontally flipped sample: measured from the other edge."""
    return bucket[0] - crop_ltrb[2]


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the size it is resized to before cropping, AR error."""

    bucket: Size
    resized_size: Size
    ar_error: float

    def crop_offset(self, rng=None) -> tuple[int, int]:
        """(left, top) of the crop window: centred, or uniformly random when ``rng`` is given."""
        dx = self.resized_size[0] - self.bucket[0]
        dy = self.resized_size[1] - self.bucket[1]
        if rng is None:
            return dx // 2, dy // 2
        return rng.randint(0, dx), rng.randint(0, dy)


def _cover(image_size: Size, bucket: Size) -> Size:
    """Size of the image scaled (aspect kept) so it covers ``bucket``, rounded half up."""
    w, h = image_size
    bw, bh = bucket
    scale = bh / h if w / h > bw / bh else bw / w
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


class BucketPlanner:
    """Assigns images to buckets for one dataset's bucketing settings."""

    def __init__(self, resolution: Size, *, enable_bucket: bool, min_reso: int, max_reso: int, steps: int,
                 no_upscale: bool):
        self.resolution = resolution
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and no_upscale
        self.steps = steps
        self.max_area = resolution[0] * resolution[1]
        if not enable_bucket:
            self.predefined: list[Size] = [resolution]
        elif self.no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(resolution, min_reso, max_reso, steps)
        self._predefined_set = set(self.predefined)
        self._aspects = np.array([w / h for w, h in self.predefined]) if self.predefined else None

    def place(self, image_size: Size, *, name: str = "") -> Placement:
        """The placement of an image of ``image_size`` (w, h); ``name`` is used in errors."""
        if self.no_upscale:
            return self._place_no_upscale(image_size, name)
        if image_size in self._predefined_set:
            return Placement(image_size, image_size, 0.0)
        aspect = image_size[0] / image_size[1]
        index = int(np.argmin(np.abs(self._aspects - aspect)))
        bucket = self.predefined[index]
        return Placement(bucket, _cover(image_size, bucket), abs(bucket[0] / bucket[1] - aspect))

    def _round(self, value: float) -> int:
        # Nearest pixel, then down to a multiple of steps: the result never exceeds the max area.
        pixels = int(value + 0.5)
        return max(self.steps, pixels - pixels % self.steps)

    def _place_no_upscale(self, image_size: Size, name: str) -> Placement:
        w, h = image_size
        aspect = w / h
        if w * h > self.max_area:
            width = math.sqrt(self.max_area * aspect)
            height = self.max_area / width
            # Round one side to steps; keep the variant whose stepped size is closer in aspect.
            w_a = self._round(width)
            err_a = abs(w_a / self._round(w_a / aspect) - aspect)
            h_b = self._round(height)
            err_b = abs(self._round(h_b * aspect) / h_b - aspect)
            if err_a < err_b:
                resized = (w_a, int(w_a / aspect + 0.5))
            else:
                resized = (int(h_b * aspect + 0.5), h_b)
        else:
            resized = (w, h)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if bucket[0] == 0 or bucket[1] == 0:
            raise DatasetError(f"image {name or image_size} ({w}x{h}) is smaller than bucket_reso_steps "
                               f"{self.steps} on one side: remove it or lower bucket_reso_steps")
        return Placement(bucket, resized, abs(bucket[0] / bucket[1] - aspect))
