"""Image discovery, loading, resizing rules and augmentations."""

from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pytest

from library.data.errors import DatasetError
from library.data.images import (color_augment, face_crop, list_images, load_image, parse_face_suffix,
                                 read_image_size, resize_image)
from library.dataset_config import build_dataset_group
from tests.data_helpers import parse, write_folder, write_image


def test_discovery_any_extension_case(tmp_path):
    for name in ["a.png", "b.JPG", "c.JpEg", "d.webp", "e.BMP", "f.txt", "g.gif"]:
        if name.endswith(("txt", "gif")):
            (tmp_path / name).write_text("x")
        else:
            write_image(tmp_path / name, (8, 8))
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.JpEg", "d.webp", "e.BMP"]


def test_sizes_and_loading(tmp_path):
    rgba = write_image(tmp_path / "x.png", (20, 10), alpha=True)
    assert read_image_size(rgba) == (20, 10)
    assert load_image(rgba).shape == (10, 20, 3)
    assert load_image(rgba, with_alpha=True).shape == (10, 20, 4)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DatasetError, match=r"bad\.jpg"):
        read_image_size(bad)
        load_image(bad)


def test_resize_interpolation_rules():
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert np.array_equal(resize_image(img, (30, 20)), cv2.resize(img, (30, 20), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_image(img, (90, 60)), cv2.resize(img, (90, 60), interpolation=cv2.INTER_LANCZOS4))
    nearest = cv2.resize(img, (30, 20), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(resize_image(img, (30, 20), "nearest"), nearest)
    assert resize_image(img, (60, 40)) is img


def test_color_augment_keeps_shape_and_sometimes_changes():
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [color_augment(img, random.Random(s)) for s in range(12)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    changed = sum(not np.array_equal(o, img) for o in outs)
    assert 0 < changed < 12


def test_face_crop_scales_face_into_window():
    img = np.zeros((600, 600, 3), np.uint8)
    img[250:350, 250:350] = 255  # the face: centre (300, 300), 100x100
    assert parse_face_suffix("photo_300_300_100_100") == ("photo", (300, 300, 100, 100))
    widths = set()
    for seed in range(8):
        out = face_crop(img, (300, 300, 100, 100), (128, 128), (2.0, 3.0), random.Random(seed))
        assert out.shape == (128, 128, 3)
        # the 128 px window shows 2..3 face sizes: the face is 128/3 .. 128/2 px wide
        width = int((out.max(axis=(0, 2)) > 127).sum())
        assert 42 <= width <= 65
        widths.add(width)
    assert len(widths) > 1  # the scale is drawn per sample


def test_fine_tuning_jsonl_and_cache_info(tmp_path):
    write_folder(tmp_path / "imgs", [(64, 64), (64, 64)])
    lines = [{"image_path": str(tmp_path / "imgs" / "img0.png"), "caption": "one", "tags": "t"},
             {"image_path": "img1.png", "caption": "two", "image_size": [64, 64]}]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"datasets": [{"resolution": 64, "subsets": [
        {"metadata_file": str(meta), "image_dir": str(tmp_path / "imgs")}]}]}))
    group, _ = build_dataset_group(parse(dataset_config=cfg, seed=1))
    assert sorted(i.caption for i in group.images()) == ["one,t", "two"]

    folder = tmp_path / "db"
    write_folder(folder, [(64, 64), (96, 64)], ["first", None])
    cfg.write_text(json.dumps({"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(folder), "cache_info": True, "class_tokens": "cls"}]}]}))
    build_dataset_group(parse(dataset_config=cfg, seed=1))
    cache = json.loads((folder / "metadata_cache.json").read_text())
    assert cache == {str(folder / "img0.png"): {"caption": "first", "resolution": [64, 64]},
                     str(folder / "img1.png"): {"caption": None, "resolution": [96, 64]}}
    (folder / "img0.caption").write_text("edited")  # the cache is trusted until deleted
    group, _ = build_dataset_group(parse(dataset_config=cfg, seed=1))
    assert sorted(i.caption for i in group.images()) == ["cls", "first"]
