"""tools/resize_images_to_resolution.py: output sizes, names, formats and associated files."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from library.model_tools.resize_images import parse_resolutions, target_size
from tests.data_helpers import write_image
from tools import resize_images_to_resolution as tool


def run(*argv) -> None:
    tool.main([*map(str, argv), "--console_log_level", "ERROR"])


def test_target_size_keeps_the_aspect_within_the_area():
    assert target_size((1024, 768), 512 * 512) == (591, 443)
    assert target_size((300, 200), 512 * 512) == (300, 200)  # already smaller: kept
    assert target_size((300, 200), 512 * 512, divisible_by=64) == (256, 192)
    for size in ((1000, 1000), (1920, 1080), (777, 3001)):
        w, h = target_size(size, 384 * 384, divisible_by=8)
        assert w * h <= 384 * 384 and w % 8 == 0 and h % 8 == 0
        assert abs(w / h - size[0] / size[1]) < 0.05
    assert parse_resolutions("512x512, 384x256,640") == [("512x512", 512, 512), ("384x256", 384, 256),
                                                         ("640x640", 640, 640)]


def test_outputs_names_sizes_and_associated_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src / "wide.png", (1024, 512), seed=1)
    write_image(src / "small.jpg", (200, 120), seed=2)
    write_image(src / "alpha.png", (600, 600), seed=3, alpha=True)
    (src / "wide.txt").write_text("a wide image")
    (src / "wide.caption").write_text("caption")
    (src / "small.tags.txt").write_text("tags")
    (src / "notes.md").write_text("not an image's file")
    run(src, dst, "--max_resolution", "512x512,256x256", "--divisible_by", "8", "--copy_associated_files")
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted(["wide+512x512.jpg", "wide+256x256.jpg", "wide+512x512.txt", "wide+256x256.txt",
                            "wide+512x512.caption", "wide+256x256.caption", "small+512x512.jpg", "small+256x256.jpg",
                            "small+512x512.tags.txt", "small+256x256.tags.txt", "alpha+512x512.jpg",
                            "alpha+256x256.jpg"])
    sizes = {p.name: Image.open(p).size for p in dst.glob("*.jpg")}
    s = math.sqrt(512 * 512 / (1024 * 512))
    assert sizes["wide+512x512.jpg"] == (int(1024 * s) // 8 * 8, int(512 * s) // 8 * 8) == (720, 360)
    assert sizes["wide+256x256.jpg"] == (360, 176)
    assert sizes["small+512x512.jpg"] == (200, 120)  # smaller than the area: only made divisible
    assert sizes["alpha+256x256.jpg"] == (256, 256)
    assert (dst / "wide+256x256.txt").read_text() == "a wide image"
    assert Image.open(dst / "alpha+512x512.jpg").mode == "RGB"


def test_png_keeps_alpha_and_bad_input_is_refused(tmp_path):
    src = tmp_path / "src"
    write_image(src / "alpha.png", (100, 80), alpha=True)
    run(src, tmp_path / "png", "--max_resolution", "64x64", "--save_as_png", "--interpolation", "lanczos4")
    out = Image.open(tmp_path / "png" / "alpha+64x64.png")
    assert out.mode == "RGBA" and out.size == (71, 57)
    with pytest.raises(SystemExit, match="WIDTHxHEIGHT"):
        run(src, tmp_path / "x", "--max_resolution", "big")
    with pytest.raises(SystemExit, match="must differ"):
        run(src, src)
