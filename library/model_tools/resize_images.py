"""``tools/resize_images_to_resolution.py``: shrink training images to one or more maximum areas.

For each image and each ``--max_resolution`` entry ``WxH`` (an area of W·H pixels, not a box), an
image larger than that area is scaled down keeping its aspect ratio, to
``floor(w·s) x floor(h·s)`` with ``s = sqrt(W·H / (w·h))``; a smaller one keeps its size. Both sides
are then rounded down to a multiple of ``--divisible_by``. The result is written to
``<dst>/<stem>+<WxH>.jpg`` (``.png`` with ``--save_as_png``), and with ``--copy_associated_files``
every other file of the same stem (captions, tag files: ``<stem>.txt``, ``<stem>.caption``,
``<stem>.tags.txt`` ...) is copied beside it as ``<stem>+<WxH><its extension>``, so the dataset
readers pair them again. Images are read and resized with the data pipeline's own functions.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from library.data.images import INTERPOLATIONS, IMAGE_EXTENSIONS, list_images, load_image
from library.io_utils import atomic_path
from library.model_tools.checkpoints import ModelToolError

logger = logging.getLogger(__name__)

#: ``--interpolation`` names: the reference's cv2 names, and the data pipeline's
INTERPOLATION_CHOICES = ("area", "cubic", "lanczos4", "lanczos", "bicubic", "linear", "bilinear", "nearest")
JPEG_QUALITY = 100


def parse_resolutions(text: str) -> list[tuple[str, int, int]]:
    """``"512x512,384x384"`` -> ``[("512x512", 512, 512), ("384x384", 384, 384)]`` (a single number: a square)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        sides = part.lower().split("x")
        try:
            w, h = (int(sides[0]), int(sides[0])) if len(sides) == 1 else (int(sides[0]), int(sides[1]))
        except ValueError:
            w = h = 0
        if len(sides) > 2 or w < 1 or h < 1:
            raise ModelToolError(f"--max_resolution {text!r}: {part!r} is not WIDTHxHEIGHT, e.g. 512x512,384x384")
        out.append((f"{w}x{h}", w, h))
    if not out:
        raise ModelToolError(f"--max_resolution {text!r}: no resolution given, e.g. 512x512,384x384")
    return out


def target_size(size: tuple[int, int], max_area: int, divisible_by: int = 1) -> tuple[int, int]:
    """The output ``(width, height)`` of an image of ``size`` for a maximum area (see the module docstring)."""
    w, h = size
    if w * h > max_area:
        scale = math.sqrt(max_area / (w * h))
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
        while w * h > max_area:  # floating-point rounding could leave one pixel too many
            w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w - w % divisible_by, h - h % divisible_by


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as im:
        return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _save(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array)
    with atomic_path(path) as tmp:
        if path.suffix == ".png":
            image.save(tmp, format="PNG")
        else:
            image.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def associated_files(image: Path) -> list[Path]:
    """Other files of the image's stem in its folder (``<stem>.<anything>``), images excluded."""
    return sorted(p for p in image.parent.glob(f"{glob_escape(image.stem)}.*")
                  if p.is_file() and p != image and p.suffix.lower() not in IMAGE_EXTENSIONS)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def resize_images(src: str, dst: str, *, max_resolution: str = "512x512,384x384,256x256", divisible_by: int = 1,
                  interpolation: str = "area", save_as_png: bool = False,
                  copy_associated_files: bool = False) -> list[Path]:
    """Write the resized images (and associated files); returns the images written."""
    source, target = Path(src), Path(dst)
    if not source.is_dir():
        raise ModelToolError(f"src_img_folder {src}: no such folder")
    if target.exists() and target.resolve() == source.resolve():
        raise ModelToolError("dst_img_folder must differ from src_img_folder (the outputs would join the inputs)")
    if divisible_by < 1:
        raise ModelToolError(f"--divisible_by {divisible_by} must be 1 or more")
    if interpolation not in INTERPOLATION_CHOICES:
        raise ModelToolError(f"--interpolation {interpolation!r}: use one of {', '.join(INTERPOLATION_CHOICES)}")
    flag = INTERPOLATIONS["lanczos" if interpolation == "lanczos4" else interpolation]
    resolutions = parse_resolutions(max_resolution)
    images = list_images(source)
    if not images:
        logger.warning("no images (%s) in %s", " ".join(IMAGE_EXTENSIONS), source)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in images:
        alpha = _has_alpha(path)
        if alpha and not save_as_png:
            logger.warning("%s has transparency, which JPEG cannot store: it is dropped (use --save_as_png to keep it)",
                           path.name)
        pixels = load_image(path, with_alpha=alpha and save_as_png)
        height, width = pixels.shape[:2]
        others = associated_files(path) if copy_associated_files else []
        for label, w, h in resolutions:
            new_w, new_h = target_size((width, height), w * h, divisible_by)
            if new_w < 1 or new_h < 1:
                logger.warning("%s (%dx%d) is smaller than --divisible_by %d: skipped for %s", path.name, width, height,
                               divisible_by, label)
                continue
            out = pixels if (new_w, new_h) == (width, height) else cv2.resize(pixels, (new_w, new_h),
                                                                             interpolation=flag)
            name = f"{path.stem}+{label}"
            out_path = target / (name + (".png" if save_as_png else ".jpg"))
            _save(np.ascontiguousarray(out), out_path)
            written.append(out_path)
            for other in others:
                shutil.copyfile(other, target / (name + other.name[len(path.stem):]))
            logger.info("%s %dx%d -> %s %dx%d", path.name, width, height, out_path.name, new_w, new_h)
    return written


def run(args) -> None:
    written = resize_images(args.src_img_folder, args.dst_img_folder, max_resolution=args.max_resolution,
                            divisible_by=args.divisible_by, interpolation=args.interpolation,
                            save_as_png=args.save_as_png, copy_associated_files=args.copy_associated_files)
    logger.info("wrote %d images to %s", len(written), args.dst_img_folder)
