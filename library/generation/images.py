"""Images in and out of ``gen_img.py``: img2img/inpaint inputs, output names, PNG text chunks.

Inputs: ``--image_path`` / ``--mask_path`` are a file or a folder (images sorted by name).
Init images are converted to RGB, resized (LANCZOS) to the generation size and scaled to [-1, 1].
A mask is read as grayscale: white (1) = repaint, black (0) = keep, resized to the latent size.

Outputs (:class:`OutputNamer`): ``im_<YYYYmmddHHMMSS>_<idx:03d>_<seed>.png`` by default,
``im_000001.png`` ... with ``--sequential_file_name`` (continuing after the highest number already in
the folder), ``<input stem>.png`` with ``--use_original_file_name`` (img2img), or the prompt's
``--f`` name (``.png`` added when it has no image suffix; ``.webp``/``.jpg`` are written as such).
A name already written in this run gets ``_1``, ``_2`` ... so nothing is overwritten by the run
itself. Files are written atomically; PNGs carry text chunks (:func:`png_text_fields`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.io_utils import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


class ImageInputError(ValueError):
    """An ``--image_path`` / ``--mask_path`` input cannot be used."""


@dataclass(frozen=True)
class InitImage:
    """An img2img input: the image (RGB), where it came from and, for inpainting, its mask (L)."""

    image: Image.Image
    path: Path
    mask: Image.Image | None = None


def list_images(path: str | Path, flag: str) -> list[Path]:
    """The image file ``path`` or the images in folder ``path`` (sorted); ``flag`` names the option in errors."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageInputError(f"{flag} {p}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise ImageInputError(f"{flag} {p}: no such file or folder")


def _open(path: Path, mode: str, flag: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "L" and im.mode in ("RGBA", "LA"):
                return im.getchannel("A") if _alpha_only(im) else im.convert("L")
            return im.convert(mode)
    except (OSError, ValueError) as e:
        raise ImageInputError(f"{flag} {path}: cannot read the image ({e})") from None


def _alpha_only(im: Image.Image) -> bool:
    # A mask drawn as transparency on a black/white-less canvas: use the alpha channel.
    return im.convert("L").getextrema() == (0, 0)


def load_init_images(image_path: str, mask_path: str | None) -> list[InitImage]:
    """Read ``--image_path`` (and ``--mask_path``: one mask for all images or one per image, in order)."""
    images = list_images(image_path, "--image_path")
    masks = list_images(mask_path, "--mask_path") if mask_path else []
    if len(masks) > 1 and len(masks) != len(images):
        raise ImageInputError(f"--mask_path has {len(masks)} masks for {len(images)} images: give one mask for all "
                              "images or one per image (matched in sorted file-name order)")
    loaded = []
    for i, path in enumerate(images):
        mask = None
        if masks:
            mask = _open(masks[i if len(masks) > 1 else 0], "L", "--mask_path")
        loaded.append(InitImage(_open(path, "RGB", "--image_path"), path, mask))
    return loaded


def image_to_tensor(image: Image.Image, width: int, height: int):
    """RGB image -> float tensor [1, 3, height, width] in [-1, 1] (LANCZOS resize when needed)."""
    import numpy as np
    import torch

    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def mask_to_latent_mask(mask: Image.Image, latent_width: int, latent_height: int):
    """Grayscale mask -> float tensor [1, 1, h, w] in [0, 1] at latent size (1 = repaint)."""
    import numpy as np
    import torch

    small = mask.convert("L").resize((latent_width, latent_height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None]


def png_text_fields(*, prompt: str, seed: int, sampler: str, steps: int, scale: float, negative_prompt: str,
                    negative_scale: float | None, width: int | None = None, height: int | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The PNG text chunks of one output image (reference key names)."""
    fields: dict[str, Any] = {"prompt": prompt, "seed": seed, "sampler": sampler, "steps": steps, "scale": scale,
                              "negative-prompt": negative_prompt}
    if negative_scale is not None:
        fields["negative-scale"] = negative_scale
    if width is not None and height is not None:
        fields["width"], fields["height"] = width, height
    fields.update(extra or {})
    return {k: str(v) for k, v in fields.items() if v is not None}


def save_image(image: Image.Image, path: Path, text: Mapping[str, str]) -> Path:
    """Write ``image`` atomically; PNG files get ``text`` as text chunks (UTF-8 iTXt when needed)."""
    fmt = _SAVE_FORMATS.get(path.suffix.lower(), "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if fmt == "PNG":
            info = PngInfo()
            for key, value in text.items():
                info.add_text(key, value)
            image.save(tmp, format="PNG", pnginfo=info)
        else:
            image.save(tmp, format=fmt)
    return path


_SEQ_RE = re.compile(r"^im_(\d{6,})\.")


class OutputNamer:
    """Output file names for one run (see the module docstring for the rules)."""

    def __init__(self, outdir: str | Path, *, sequential: bool, use_original: bool) -> None:
        self.outdir = Path(outdir)
        self.sequential = sequential
        self.use_original = use_original
        self._used: set[str] = set()
        self._counter = 0
        self._index = 0
        if sequential and self.outdir.is_dir():
            numbers = [int(m.group(1)) for f in self.outdir.iterdir() if (m := _SEQ_RE.match(f.name))]
            self._counter = max(numbers, default=0)

    def next_name(self, *, seed: int, file_name: str | None = None, original: Path | None = None,
                  suffix: str = "") -> Path:
        """Path of the next image. ``suffix`` (e.g. ``"_1st"``) goes before the extension."""
        index = self._index
        self._index += 1
        if file_name:
            stem, ext = _split_name(file_name)
        elif self.use_original and original is not None:
            stem, ext = original.stem, ".png"
        elif self.sequential:
            self._counter += 1
            stem, ext = f"im_{self._counter:06d}", ".png"
        else:
            stem, ext = f"im_{time.strftime('%Y%m%d%H%M%S')}_{index:03d}_{seed}", ".png"
        return self._unique(stem + suffix, ext)

    def _unique(self, stem: str, ext: str) -> Path:
        name, n = stem + ext, 0
        while name in self._used:
            n += 1
            name = f"{stem}_{n}{ext}"
        self._used.add(name)
        return self.outdir / name


def _split_name(file_name: str) -> tuple[str, str]:
    p = Path(file_name)
    if p.name != file_name or file_name in ("", ".", ".."):
        raise ImageInputError(f"--f {file_name!r}: give a file name without folders (outputs go to --outdir)")
    if p.suffix.lower() in _SAVE_FORMATS:
        return p.stem, p.suffix
    return p.name, ".png"
