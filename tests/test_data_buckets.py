"""Bucket list, bucket assignment, crops and the SDXL crop bookkeeping."""

from __future__ import annotations

import random

import pytest

from library.data.buckets import (BucketPlanner, adjust_bucket_limits, flipped_crop_left, make_bucket_resolutions,
                                  sai_crop_ltrb)
from library.data.dataset import BucketedDataset
from library.data.errors import DatasetError
from library.data.params import DatasetParams

# Derived by hand for area 512*512, steps 64, sides 256..1024: for each width the largest multiple
# of 64 whose product with the width stays within the area (capped at 1024), both orientations.
EXPECTED_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_bucket_list_for_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == EXPECTED_512


def test_bucket_list_non_square_resolution_adds_square_of_area():
    resos = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert (576, 576) in resos  # isqrt(393216) = 627 -> 576
    assert all(w * h <= 768 * 512 for w, h in resos)


def planner(**kw) -> BucketPlanner:
    opts = dict(enable_bucket=True, min_reso=256, max_reso=1024, steps=64, no_upscale=False)
    opts.update(kw)
    return BucketPlanner((512, 512), **opts)


def test_exact_match_keeps_size():
    p = planner().place((640, 384))
    assert (p.bucket, p.resized_size, p.ar_error) == ((640, 384), (640, 384), 0.0)


@pytest.mark.parametrize("size, bucket, resized", [
    # 2.0: nearest AR is 704x320 (2.2); wider bucket -> scale by width 704/1000
    ((1000, 500), (704, 320), (704, 352)),
    # 0.75: nearest 448x576 (0.778); bucket wider -> scale by width 448/300 -> 448x597.33 -> 597
    ((300, 400), (448, 576), (448, 597)),
    # square upscaled to 512
    ((100, 100), (512, 512), (512, 512)),
    # 1.5: 576x448 (1.286) vs 640x384 (1.667) -> |1.5-1.286|=.214 < .167? no: 640x384 err .167 wins
    ((1200, 800), (640, 384), (640, 427)),
])
def test_nearest_aspect_bucket_and_cover_resize(size, bucket, resized):
    p = planner().place(size)
    assert p.bucket == bucket and p.resized_size == resized
    assert p.ar_error == pytest.approx(abs(bucket[0] / bucket[1] - size[0] / size[1]))
    left, top = p.crop_offset()
    assert (left, top) == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    rng = random.Random(1)
    left, top = p.crop_offset(rng)
    assert 0 <= left <= resized[0] - bucket[0] and 0 <= top <= resized[1] - bucket[1]


def test_no_upscale_buckets():
    p = planner(no_upscale=True)
    small = p.place((300, 200))  # smaller than the area: never upscaled, floored to steps
    assert small.bucket == (256, 192) and small.resized_size == (300, 200)
    big = p.place((1024, 1024))  # scaled down to the area
    assert big.bucket == (512, 512) and big.resized_size == (512, 512)
    # area 512^2 at AR 2 is 724x362. Flooring the width to 704 gives height 352 -> 320 (AR 2.2);
    # flooring the height to 320 gives width 640 (AR 2.0): the height variant wins.
    wide = p.place((2000, 1000))
    assert wide.resized_size == (640, 320) and wide.bucket == (640, 320)
    # 1000x700 (AR 1.4286) at area 512^2 is 611.9x428.4: width 612 -> 576, height 576/AR = 403 ->
    # 384 (AR 1.5) beats height 428 -> 384, width 549 -> 512 (AR 1.33); resized keeps 576x403
    tall = p.place((1000, 700))
    assert tall.resized_size == (576, 403) and tall.bucket == (576, 384)
    fits = p.place((500, 300))  # area fits: not resized, bucket floored to steps, remainder cropped
    assert fits.resized_size == (500, 300) and fits.bucket == (448, 256)
    with pytest.raises(DatasetError, match="smaller than bucket_reso_steps"):
        p.place((40, 300), name="tiny.png")


def test_no_bucketing_single_bucket():
    p = BucketPlanner((128, 96), enable_bucket=False, min_reso=256, max_reso=1024, steps=64, no_upscale=False)
    assert p.place((128, 96)).resized_size == (128, 96)
    other = p.place((256, 256))
    assert other.bucket == (128, 96) and other.resized_size == (128, 128)


def test_min_max_adjusted_to_steps():
    assert adjust_bucket_limits(200, 1000, 64) == (192, 960)
    assert adjust_bucket_limits(256, 1024, 64) == (256, 1024)


def test_sai_crop_ltrb_and_flip():
    # a 2:1 image in a square bucket: full width, letterboxed vertically
    assert sai_crop_ltrb((512, 512), (1000, 500)) == (0, 128, 512, 384)
    # a 1:2 image in a square bucket: pillarboxed
    ltrb = sai_crop_ltrb((512, 512), (500, 1000))
    assert ltrb == (128, 0, 384, 512)
    assert flipped_crop_left((512, 512), ltrb) == 128
    assert flipped_crop_left((640, 384), (10, 0, 600, 384)) == 40


def test_resolution_outside_bucket_range_is_an_error():
    params = DatasetParams(kind="dreambooth", subsets=(), resolution=(512, 512), enable_bucket=True,
                           min_bucket_reso=64, max_bucket_reso=256, where="datasets[0]")
    with pytest.raises(DatasetError, match=r"datasets\[0\]: resolution 512x512 is outside"):
        BucketedDataset(params, [], [])
