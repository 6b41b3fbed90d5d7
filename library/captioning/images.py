"""The images of a folder, and decoding one of them for a captioner.

Image extensions are the ones training accepts (``library.data.images.IMAGE_EXTENSIONS``, any
case), so every image a captioner writes a file for is one the dataset reads.
"""

from __future__ import annotations

from pathlib import Path

from library.captioning.errors import CaptioningError

WHITE = (255, 255, 255)


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message says why (the runner skips the file)."""


def find_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` (and its sub-folders with ``recursive``), sorted by relative path.

    Raises :class:`CaptioningError` when ``folder`` is not a folder.
    """
    from library.data.errors import DatasetError
    from library.data.images import list_images  # imports torch/cv2: only once the flags are parsed

    folder = Path(folder)
    if not folder.is_dir():
        raise CaptioningError(f"train_data_dir {folder} does not exist or is not a folder: give the folder "
                              "holding the images")
    try:
        return list_images(folder, recursive=recursive)
    except DatasetError as e:
        raise CaptioningError(str(e)) from None


def load_rgb(path: str | Path):
    """Decode ``path`` to an RGB ``PIL.Image``; transparent parts become white.

    Transparency (RGBA, LA, palette with a transparent index) is composited on a white background,
    the background taggers are trained with; a plain ``convert("RGB")`` would show whatever colour the
    transparent pixels happen to hold (often black). Raises :class:`UnreadableImage`.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, WHITE + (255,))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken / truncated files
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
