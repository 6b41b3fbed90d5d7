"""CLIP-Vision conditioning of SDXL img2img in ``gen_img.py`` (``--clip_vision_strength``).

The init image (``--image_path``) is encoded by a CLIP vision model with projection (transformers'
``CLIPVisionModelWithProjection``, preprocessing by its ``CLIPImageProcessor``); its
``image_embeds`` times the strength replace the positive prompt's pooled text embedding (SDXL's
``text_embeds`` added conditioning; the negative / unconditional rows keep theirs), as the
reference does. The image is still the img2img start (``--strength``).

The model (``--clip_vision_model``, default :data:`DEFAULT_CLIP_VISION_MODEL`, the ViT-bigG-14
whose 1280-d image embeddings match SDXL's pooled text embedding) comes from local files only: a
folder with ``config.json`` and the weights, or a hub id already in the local Hugging Face cache.

Importing this module is cheap (the command line reads :data:`DEFAULT_CLIP_VISION_MODEL`); torch
and transformers load in :func:`load_clip_vision`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CLIP_VISION_MODEL", "ClipVisionEncoder", "ClipVisionError", "find_clip_vision_model",
           "load_clip_vision"]

DEFAULT_CLIP_VISION_MODEL = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


class ClipVisionError(ValueError):
    """The ``--clip_vision_model`` cannot be found or loaded; the message says how to fix it."""


def find_clip_vision_model(name: str | None) -> Path:
    """The local folder of ``--clip_vision_model`` ``name`` (None: the default hub id); never downloads.

    A folder must hold ``config.json``; anything else is looked up as a hub id in the local Hugging
    Face cache. Cheap (no model is read), so a run can check it before loading the SDXL model.
    """
    name = name or DEFAULT_CLIP_VISION_MODEL
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipVisionError(f"--clip_vision_model {name}: the folder has no config.json; save the model there "
                                  "with CLIPVisionModelWithProjection.save_pretrained (config.json + weights)")
        return path
    if path.exists():
        raise ClipVisionError(f"--clip_vision_model {name} is a file: give the folder holding its config.json and "
                              "weights (a Hugging Face model folder)")
    from library.families.t5_tokenizer import hub_cache_folder

    cached = hub_cache_folder(name, ("config.json",))
    if cached is not None:
        return cached
    raise ClipVisionError(f"--clip_vision_model {name}: no such folder and not in the local Hugging Face cache "
                          f"(nothing is downloaded); download {DEFAULT_CLIP_VISION_MODEL} (config.json, "
                          "preprocessor_config.json, model weights) to a folder and pass --clip_vision_model FOLDER")


def _projection_dim(folder: Path) -> dict[str, Any]:
    """``from_pretrained`` overrides for a full CLIP model's folder (model_type "clip", as the default
    hub repo is): its projection width is top-level, and the vision sub-config alone would give
    transformers' default (512) and a size mismatch for ``visual_projection``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClipVisionError(f"--clip_vision_model {folder}: cannot read config.json ({e})") from None
    if config.get("model_type") == "clip" and "projection_dim" in config:
        return {"projection_dim": int(config["projection_dim"])}
    return {}


class ClipVisionEncoder:
    """A CLIP vision model with projection and its image preprocessing; :meth:`encode` -> image embeddings."""

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        self.model, self.processor, self.name = model, processor, name

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``image_embeds`` [B, projection_dim] (float32) of RGB images."""
        import torch

        p = next(self.model.parameters())
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return self.model(pixel_values=pixels.to(p.device, p.dtype)).image_embeds.float()


def load_clip_vision(name: str | None, device: torch.device, dtype: torch.dtype) -> ClipVisionEncoder:
    """Load ``--clip_vision_model`` ``name`` from local files (rules in the module docstring)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    folder = find_clip_vision_model(name)
    shown = name or DEFAULT_CLIP_VISION_MODEL
    again = f"download {DEFAULT_CLIP_VISION_MODEL} there again"
    # transformers' load report would list every weight of a full CLIP checkpoint's unused text tower;
    # weights the vision model lacks (left random) are checked below instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **_projection_dim(folder))
    except (OSError, ValueError, RuntimeError) as e:
        raise ClipVisionError(f"--clip_vision_model {shown}: cannot load a CLIPVisionModelWithProjection from "
                              f"{folder} ({str(e).splitlines()[0]}); {again}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ClipVisionError(f"--clip_vision_model {shown}: {folder} lacks {len(missing)} weight(s) of a "
                              f"CLIPVisionModelWithProjection (e.g. {missing[0]}); {again}")
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        # CLIP's standard preprocessing (resize, center crop, OpenAI mean/std) at the model's input size.
        size = int(model.config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        logger.info("--clip_vision_model %s: no preprocessor_config.json, using CLIP's standard preprocessing at "
                    "%dx%d", shown, size, size)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("CLIP vision model %s loaded (image embeddings %d-d)", shown, model.config.projection_dim)
    return ClipVisionEncoder(model, processor, shown)
