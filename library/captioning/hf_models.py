"""Loading a transformers captioner (model + processor) from a Hugging Face repo id or a local folder.

* An existing folder is loaded from disk only (it must hold what ``save_pretrained`` writes for the
  model and its processor: ``config.json``, the weights, the tokenizer and image-processor files).
* A repo id (``Salesforce/blip-image-captioning-large``) goes through ``from_pretrained``: the
  Hugging Face cache, downloading on first use. With ``HF_HUB_OFFLINE=1`` (or
  ``TRANSFORMERS_OFFLINE=1``) in the environment only the cache is looked at.
* Anything else -- a path that does not exist, a repo that cannot be had -- is a
  :class:`CaptioningError` of one line naming what was looked for and how to provide it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, TypeVar

from library.captioning.errors import CaptioningError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".onnx")


def is_offline() -> bool:
    """Whether the environment asks for no downloads (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(value: str) -> bool:
    """True for values that can only be a file-system path, never a repo id (``owner/name`` or ``name``)."""
    return (value.startswith(("/", ".", "~")) or "\\" in value or ":" in value or value.count("/") > 1
            or value.lower().endswith(_FILE_SUFFIXES))


def first_line(error: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, shortened: the part of a long hub error worth showing."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def download_hint(repo_id: str) -> str:
    folder = "models/" + repo_id.rsplit("/", 1)[-1]
    return (f"run once with internet access, or download it (hf download {repo_id} --local-dir {folder}) "
            "and pass that folder")


def folder_model_type(folder: Path) -> str | None:
    """``model_type`` of ``folder/config.json`` (None when unreadable: transformers will say why)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_pretrained(source: str, load: Callable[[str, dict], T], *, flag: str, what: str, example: str,
                    model_type: str | None = None) -> T:
    """``load(source_or_folder, from_pretrained_kwargs)`` with the errors turned into one-line messages.

    ``flag`` is the option the user gave (``--caption_weights``), ``what`` names the model kind in
    messages ("BLIP captioning model"), ``example`` is a repo id that works. A local folder whose
    ``config.json`` names another ``model_type`` than ``model_type`` is refused before loading.
    """
    folder = Path(os.path.expanduser(source))
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise CaptioningError(f"{flag} {source}: the folder has no config.json; give a folder written by "
                                  f"save_pretrained (model and processor files) or a repo id such as {example}")
        found_type = folder_model_type(folder)
        if model_type is not None and found_type is not None and found_type != model_type:
            raise CaptioningError(f"{flag} {source}: the folder holds a '{found_type}' model, not a {what} "
                                  f"('{model_type}'): give a {what} folder or a repo id such as {example}")
        try:
            result = load(str(folder), {})
        except Exception as e:  # transformers raises many types for a broken or foreign folder
            raise CaptioningError(f"{flag} {source}: cannot load the {what} from this folder ({first_line(e)}): "
                                  f"give a folder written by save_pretrained for a {what}") from e
        logger.info("%s loaded from %s", what, folder)
        return result
    if looks_like_path(source):
        raise CaptioningError(f"{flag} {source}: no such folder; give a folder with the {what} (saved with "
                              f"save_pretrained) or a Hugging Face repo id such as {example}")
    kwargs = {"local_files_only": True} if is_offline() else {}
    try:
        result = load(source, kwargs)
    except Exception as e:  # OSError (not found / no connection), ValueError (bad id) ...
        where = "the Hugging Face cache (offline mode)" if kwargs else "the Hugging Face Hub or its cache"
        raise CaptioningError(f"{flag} {source}: not a local folder, and the {what} could not be loaded from "
                              f"{where} ({first_line(e)}): {download_hint(source)}") from e
    logger.info("%s %s loaded", what, source)
    return result


def pick_device() -> str:
    """``cuda`` when a GPU is available, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
