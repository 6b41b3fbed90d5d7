"""Running a WD14-style tagger (``model.onnx``) with onnxruntime, and the input it expects.

The model takes ``[batch, height, width, 3]`` float32 images (NHWC) in **BGR** order with values
0-255, and returns ``[batch, number of tags]`` probabilities (sigmoid already applied). Each image
is made so by :func:`preprocess`: padded to a square on white (centred), resized to the model's
input size (read from the ONNX input shape; area averaging when shrinking, Lanczos when enlarging),
channels reversed to BGR.

onnxruntime is an optional extra (``pip install onnxruntime``, or ``onnxruntime-gpu`` for CUDA):
:func:`import_onnxruntime` turns its absence into a one-line :class:`CaptioningError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from library.captioning.errors import CaptioningError
from library.captioning.hf_models import first_line

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

logger = logging.getLogger(__name__)

INSTALL_HINT = ("onnxruntime is not installed: the WD14 tagger needs it; install it with `pip install onnxruntime` "
                "(or `pip install onnxruntime-gpu` to tag on a CUDA GPU)")
DEFAULT_SIZE = 448  # the input size of the WD14 taggers, used when a model leaves it open
_PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                        "CPUExecutionProvider")


def import_onnxruntime():
    """The ``onnxruntime`` module, or :class:`CaptioningError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise CaptioningError(INSTALL_HINT) from None
    return onnxruntime


def pad_to_square(image: np.ndarray, fill: int = 255) -> np.ndarray:
    """HWC ``image`` centred on a ``fill``-coloured square canvas of its longer side."""
    import numpy as np

    h, w = image.shape[:2]
    side = max(h, w)
    if h == w:
        return image
    canvas = np.full((side, side, image.shape[2]), fill, dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def preprocess(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB PIL image -> the ``[height, width, 3]`` float32 BGR 0-255 array a WD14 tagger takes; ``size`` = (w, h)."""
    import cv2
    import numpy as np

    array = pad_to_square(np.asarray(image.convert("RGB"), dtype=np.uint8))
    if (array.shape[1], array.shape[0]) != tuple(size):
        shrinking = array.shape[0] > size[1] or array.shape[1] > size[0]
        array = cv2.resize(array, tuple(size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)
    return np.ascontiguousarray(array[:, :, ::-1], dtype=np.float32)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxTagger:
    """An onnxruntime session on ``model.onnx``; call it with ``[n, h, w, 3]`` float32 to get ``[n, tags]``.

    ``input_size`` is (width, height) from the input shape. A model with a fixed batch size is run
    in chunks of that size (the last one padded), so any ``--batch_size`` works.
    """

    def __init__(self, model_path: str | Path, providers: list[str] | None = None):
        ort = import_onnxruntime()
        if providers is None:
            available = set(ort.get_available_providers())
            providers = [p for p in _PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: onnxruntime's warnings are not for the user
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise CaptioningError(f"cannot load the tagger model {model_path} ({first_line(e)}): download it again "
                                  "with --force_download or give another --model_dir") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or _static(inputs[0].shape[3]) != 3:
            shapes = [list(i.shape) for i in inputs]
            raise CaptioningError(f"the tagger model {model_path} takes inputs {shapes}: a WD14-style tagger takes "
                                  "one [batch, height, width, 3] image input")
        self.input_name = inputs[0].name
        batch, height, width, _ = inputs[0].shape
        self.fixed_batch = _static(batch)
        if _static(height) is None or _static(width) is None:
            logger.warning("the tagger model does not fix its input size: using %dx%d", DEFAULT_SIZE, DEFAULT_SIZE)
        self.input_size = (_static(width) or DEFAULT_SIZE, _static(height) or DEFAULT_SIZE)
        out_shape = outputs[0].shape
        self.num_tags = _static(out_shape[-1]) if len(out_shape) == 2 else None
        logger.info("tagger %s: input %dx%d, %s tags, providers %s", Path(model_path).name, *self.input_size,
                    self.num_tags if self.num_tags is not None else "?", ", ".join(self.session.get_providers()))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import numpy as np

        images = np.asarray(images, dtype=np.float32)
        step = self.fixed_batch or len(images)
        results = []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:], dtype=np.float32)])
            out = self.session.run(None, {self.input_name: chunk})[0]
            results.append(np.asarray(out, dtype=np.float32).reshape(step, -1)[:n])
        return np.concatenate(results)
