"""Control images of ``gen_img.py``: ``--guide_image_path`` inputs and ``--control_net_preps``.

Guide images (``--guide_image_path``: files and/or folders, images of a folder sorted by name) are
used in order, one per generated image, cycling: image ``k`` of the run gets guide ``k % n``. Each is
resized (bilinear) to the size of the pass it conditions, preprocessed, and given to the control
models as RGB in ``[0, 1]`` (``[B, 3, H, W]``).

Preprocessing, one entry per control model (``--control_net_preps``):

* ``none`` (or no entry): the guide image is used as it is (already an edge map, depth map, ...);
* ``canny`` / ``canny_<low>`` / ``canny_<low>_<high>``: OpenCV Canny edges of the grayscale image,
  thresholds ``low``/``high`` (default 63 and 191, as the reference), white edges on black, as RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from library.generation.images import ImageInputError, _open, list_images

__all__ = ["CANNY_DEFAULT_THRESHOLDS", "ControlInputError", "Prep", "canny_edges", "guide_tensor",
           "load_guide_images", "parse_prep"]

CANNY_DEFAULT_THRESHOLDS = (63, 191)

#: A preprocessing step: RGB PIL image -> RGB PIL image of the same size.
Prep = Callable[[Image.Image], Image.Image]


class ControlInputError(ImageInputError):
    """A control flag or guide image cannot be used; the message names the flag and the fix."""


def load_guide_images(paths: Sequence[str] | None) -> list[Image.Image]:
    """The RGB images of ``--guide_image_path`` (each a file or a folder), in the order given."""
    images = []
    for path in paths or []:
        images.extend(_open(file, "RGB", "--guide_image_path") for file in list_images(path, "--guide_image_path"))
    return images


def canny_edges(image: Image.Image, low: int = CANNY_DEFAULT_THRESHOLDS[0],
                high: int = CANNY_DEFAULT_THRESHOLDS[1]) -> Image.Image:
    """Canny edges (255 on 0) of ``image`` as an RGB image of the same size."""
    import cv2

    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, int(low), int(high))
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


@dataclass(frozen=True)
class _Canny:
    low: int
    high: int

    def __call__(self, image: Image.Image) -> Image.Image:
        return canny_edges(image, self.low, self.high)


def parse_prep(spec: str | None) -> Prep | None:
    """``none``/None -> no preprocessing; ``canny[_low[_high]]`` -> Canny edges (module docstring)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    name, *values = spec.strip().split("_")
    if name.lower() != "canny" or len(values) > 2:
        raise ControlInputError(f"--control_net_preps {spec}: unknown preprocessing; use none, canny, or canny_<low>_<high> "
                                "(e.g. canny_63_191)")
    try:
        thresholds = [int(v) for v in values]
    except ValueError:
        raise ControlInputError(f"--control_net_preps {spec}: Canny thresholds must be integers, e.g. canny_63_191") from None
    low, high = (thresholds + list(CANNY_DEFAULT_THRESHOLDS[len(thresholds):]))[:2]
    if not 0 <= low <= high:
        raise ControlInputError(f"--control_net_preps {spec}: need 0 <= low <= high thresholds, e.g. canny_63_191")
    return _Canny(low, high)


def guide_tensor(images: Sequence[Image.Image], width: int, height: int, prep: Prep | None = None) -> torch.Tensor:
    """``[B, 3, height, width]`` float32 in ``[0, 1]``: each image resized, then preprocessed (edges
    found at the size they are used at stay one pixel wide)."""
    rows = []
    for image in images:
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        if prep is not None:
            image = prep(image)
        rows.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(rows)

