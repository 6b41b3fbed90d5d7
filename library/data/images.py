"""Image files: discovery, size reading, decoding, resizing, cropping and augmentation.

Arrays are HWC ``uint8`` in RGB (RGBA when the alpha channel is wanted) until :func:`to_tensor`
turns them into CHW float in [-1, 1]. Every failure names the file.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import cv2
import imagesize
import numpy as np
import torch
from PIL import Image

from library.data.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# cv2 flags for --resize_interpolation / resize_interpolation ("box" exists only in the TOML schema
# of the reference; area averaging is the same box filter when shrinking).
INTERPOLATIONS = {
    "lanczos": cv2.INTER_LANCZOS4,
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "box": cv2.INTER_AREA,
}

_FACE_SUFFIX = re.compile(r"^(?P<stem>.*)_(?P<cx>\d+)_(?P<cy>\d+)_(?P<w>\d+)_(?P<h>\d+)$")


#: image formats people have that are not read (PIL could, but kohya's list is the compatibility surface)
OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jfif", ".tga", ".psd", ".ico")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def unsupported_image_files(folder: Path) -> list[str]:
    """Names of the files in ``folder`` that look like images of a format that is not read (a subset
    of only such files is empty, and the user should learn why)."""
    try:
        return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in OTHER_IMAGE_EXTENSIONS)
    except OSError:
        return []


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files inside ``folder`` (also in its sub-folders with ``recursive``), any extension
    case, sorted by path relative to ``folder`` (by name when not recursive)."""
    folder = Path(folder)
    try:
        entries = list(folder.rglob("*") if recursive else folder.iterdir())
    except OSError as e:
        raise DatasetError(f"cannot list image folder {folder}: {e.strerror or e}") from e
    return sorted((p for p in entries if p.is_file() and is_image_file(p)),
                  key=lambda p: p.relative_to(folder).as_posix())


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (``imagesize``), falling back to PIL for odd formats.

    Raises :class:`DatasetError` naming the file when neither can read it, so a corrupt or
    truncated-header image is reported while the dataset is built, not hours into training.
    """
    try:
        w, h = imagesize.get(str(path))
    except Exception:  # imagesize raises assorted errors on garbage input
        w, h = -1, -1
    if not (w > 0 and h > 0):
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:
            raise DatasetError(f"cannot read image {path}: {e} -- replace or remove the file") from e
    # PIL refuses to decode images over twice MAX_IMAGE_PIXELS (its decompression-bomb guard; above
    # once it only warns): say so now rather than when the image is first decoded.
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if limit and w * h > limit:
        raise DatasetError(f"image {path} is {w}x{h} ({w * h / 1e6:.0f} megapixels), over the decoder's limit of "
                           f"{limit / 1e6:.0f} megapixels: resize it (e.g. tools/resize_images_to_resolution.py) "
                           "or remove it")
    if _looks_truncated(path):
        _decode_fully(path)  # a cut-off download: found while the dataset is built, not at its first step
    return int(w), int(h)


def _looks_truncated(path: Path) -> bool:
    """Whether the file does not end the way its format says (cheap: a few header and tail bytes).

    PNG ends with the IEND chunk, JPEG with the EOI marker (some cameras append data after it: a
    suspect is only refused after a full decode fails); WebP (RIFF) and BMP headers state the file's
    length, so a shorter file was cut off.
    """
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError:
        return True
    if suffix == ".png":
        return tail[-8:-4] != b"IEND"
    if suffix == ".webp":  # "RIFF" <uint32 LE: length after these 8 bytes> "WEBP" ...
        return head[:4] == b"RIFF" and len(head) == 8 and size < 8 + int.from_bytes(head[4:8], "little")
    if suffix == ".bmp":  # "BM" <uint32 LE: file length> (0 from some writers: unknown)
        return head[:2] == b"BM" and len(head) >= 6 and size < int.from_bytes(head[2:6], "little")
    return not tail.rstrip(b"\x00").endswith(b"\xff\xd9")


def _decode_fully(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        # Only called for a file that ends early, so the cause is known even when PIL's words are vague.
        raise DatasetError(f"cannot decode image {path}: {e} (the file ends early: an interrupted copy or "
                           "download?) -- replace or remove the file") from e


def load_image(path: Path, *, with_alpha: bool = False) -> np.ndarray:
    """Decode ``path`` to HWC uint8 RGB, or RGBA when ``with_alpha`` (opaque alpha if the file has none).

    EXIF orientation is not applied: sizes come from the file header, and buckets must agree.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGBA" if with_alpha else "RGB") if im.mode not in _WIDE_MODES else _wide_to_rgb(im)
            image = np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:
        raise DatasetError(f"cannot decode image {path}: {e} -- replace or remove the file") from e
    if with_alpha and image.shape[-1] == 3:
        image = np.concatenate([image, np.full_like(image[..., :1], 255)], axis=-1)
    return image


#: grayscale modes with more than 8 bits (16-bit PNGs): PIL's convert("RGB") clips them to 255, not scales
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    values = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The red channel of the mask image ``path`` as HW uint8 (255 = train), resized to ``size`` (w, h).

    A mask of another size is resized bilinearly (its aspect ratio was checked at build time).
    """
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("RGB"), dtype=np.uint8)[..., 0].copy()
    except Exception as e:
        raise DatasetError(f"cannot decode mask image {path}: {e} -- replace or remove the file") from e
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        mask = cv2.resize(mask, tuple(int(s) for s in size), interpolation=cv2.INTER_LINEAR)
    return mask


def load_conditioning_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A ControlNet conditioning image as HWC uint8 RGB at ``size`` (w, h), the size of its image (one of
    another size but the same aspect ratio is resized, as :func:`resize_image` would)."""
    image = load_image(path)
    if (image.shape[1], image.shape[0]) != tuple(size):
        image = resize_image(image, size)
    return image


def conditioning_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 in [0, 1] (what ControlNets take, unlike the [-1, 1] of the VAE)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def resize_image(image: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize to ``size`` = (width, height).

    Without an explicit ``interpolation``: area averaging when shrinking (no aliasing), Lanczos
    when enlarging (sharpest). Returns the input unchanged when the size already matches.
    """
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    if interpolation is None:
        flag = cv2.INTER_AREA if size[0] <= w and size[1] <= h else cv2.INTER_LANCZOS4
    else:
        flag = INTERPOLATIONS[interpolation]
    return cv2.resize(image, tuple(int(s) for s in size), interpolation=flag)


def crop_image(image: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    return image[top : top + height, left : left + width]


def color_augment(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Weak colour augmentation of an RGB image.

    With probability 1/3 the hue is shifted by up to +-8 (OpenCV hue units, 0..179); with
    probability 1/3 a gamma in [0.95, 1.05] is applied; otherwise the image is unchanged.
    """
    choice = rng.random()
    if choice < 1 / 3:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = rng.randint(-8, 8)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if choice < 2 / 3:
        gamma = rng.uniform(0.95, 1.05)
        table = (np.clip((np.arange(256) / 255.0) ** gamma, 0, 1) * 255 + 0.5).astype(np.uint8)
        return table[image]
    return image


def split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB, alpha mask float32 [H,W] in [0,1]) from RGBA; (RGB, None) from RGB."""
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[..., :3]), image[..., 3].astype(np.float32) / 255.0
    return image, None


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


# ------------------------------------------------------------------------------------ faces


def parse_face_suffix(stem: str) -> tuple[str, tuple[int, int, int, int] | None]:
    """Split ``name_cx_cy_w_h`` into ("name", (cx, cy, w, h)); other stems give (stem, None)."""
    m = _FACE_SUFFIX.match(stem)
    if not m:
        return stem, None
    return m["stem"], (int(m["cx"]), int(m["cy"]), int(m["w"]), int(m["h"]))


def face_crop(image: np.ndarray, face: tuple[int, int, int, int], target: tuple[int, int],
              scale_range: tuple[float, float], rng: random.Random, *, random_offset: bool = False,
              interpolation: str | None = None) -> np.ndarray:
    """Crop ``target`` (w, h) around a face whose position and size come from the file name
    (the window of :func:`face_crop_window`)."""
    h, w = image.shape[:2]
    size, (left, top) = face_crop_window((w, h), face, target, scale_range, rng, random_offset=random_offset)
    return crop_image(resize_image(image, size, interpolation), left, top, *target)


def face_crop_window(image_size: tuple[int, int], face: tuple[int, int, int, int], target: tuple[int, int],
                     scale_range: tuple[float, float], rng: random.Random, *,
                     random_offset: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where :func:`face_crop` crops: (the size (w, h) the image is resized to, the (left, top) of the
    ``target`` window in it). A conditioning image gets the same window as its image.

    ``scale_range`` = (lo, hi): the crop's shorter side shows between lo and hi times the face
    size. The image is only scaled down for that (never above its own size, unless it must grow to
    cover the target). The window is centred on the face, jittered by up to 1/20 of the face size
    when lo != hi, or moved randomly (more often near the face) with ``random_offset``; it always
    stays inside the image.
    """
    w, h = image_size
    cx, cy, fw, fh = face
    tw, th = target
    lo, hi = scale_range
    face_size = max(fw, fh, 1)
    cover = max(tw / w, th / h)
    small = min(1.0, max(cover, min(tw, th) / (face_size * hi)))
    large = min(1.0, max(small, min(tw, th) / (face_size * lo)))
    scale = max(cover, rng.uniform(small, large) if large > small else small)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    scaled_face = face_size * scale
    offsets = []
    for centre, length, size in ((cx * scale, rw, tw), (cy * scale, rh, th)):
        start = round(centre - size / 2)
        if random_offset:
            reach = int(max(length - centre, centre))
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach  # triangular: near the face more often
        elif lo != hi and scaled_face >= 40:
            jitter = int(scaled_face // 20)
            start += rng.randint(-jitter, jitter)
        offsets.append(min(max(0, start), length - size))
    return (rw, rh), (offsets[0], offsets[1])
