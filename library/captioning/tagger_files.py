"""Where a tagger's ``model.onnx`` and ``selected_tags.csv`` come from.

In this order:

1. ``--model_dir`` itself, when it holds both files (a tagger downloaded or exported by hand);
2. ``<model_dir>/<repo_id with / replaced by _>``, when it holds both files (an earlier download),
   unless ``--force_download``;
3. downloaded from the Hugging Face repo ``--repo_id`` into that sub-folder (huggingface_hub).
"""

from __future__ import annotations

import logging
from pathlib import Path

from library.captioning.errors import CaptioningError
from library.captioning.hf_models import first_line, is_offline

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
FILES = (MODEL_FILE, TAGS_FILE)


def has_tagger_files(folder: Path) -> bool:
    return all((Path(folder) / name).is_file() for name in FILES)


def download_folder(model_dir: str | Path, repo_id: str) -> Path:
    """``<model_dir>/<repo_id with / replaced by _>``: where a repo's files are downloaded to."""
    return Path(model_dir) / repo_id.replace("/", "_")


def download_file(repo_id: str, filename: str, folder: Path, *, force: bool = False) -> Path:
    """Download one file of ``repo_id`` into ``folder`` (huggingface_hub); returns its path."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(folder), force_download=force))


def find_tagger_files(repo_id: str, model_dir: str | Path, *, force_download: bool = False) -> Path:
    """The folder holding ``model.onnx`` and ``selected_tags.csv`` (see the module docstring)."""
    model_dir = Path(model_dir)
    if not force_download and has_tagger_files(model_dir):
        logger.info("using the tagger in %s (--repo_id is not used)", model_dir)
        return model_dir
    folder = download_folder(model_dir, repo_id)
    if not force_download and has_tagger_files(folder):
        logger.info("using the tagger %s in %s", repo_id, folder)
        return folder
    if is_offline():
        raise CaptioningError(f"no {MODEL_FILE} and {TAGS_FILE} in --model_dir {model_dir} or {folder}, and "
                              f"HF_HUB_OFFLINE is set: put the two files of {repo_id} into {model_dir}, or run online")
    logger.info("downloading %s from %s into %s", " and ".join(FILES), repo_id, folder)
    for name in FILES:
        try:
            download_file(repo_id, name, folder, force=force_download)
        except ImportError:
            raise CaptioningError("huggingface_hub is not installed, so --repo_id cannot be downloaded: "
                                  f"pip install huggingface_hub, or put {MODEL_FILE} and {TAGS_FILE} into "
                                  f"--model_dir {model_dir}") from None
        except Exception as e:  # not found, no connection, gated repo ...
            raise CaptioningError(f"cannot download {name} of --repo_id {repo_id} ({first_line(e)}): check the repo "
                                  f"id (it must have an ONNX model) and the connection, or put {MODEL_FILE} and "
                                  f"{TAGS_FILE} into --model_dir {model_dir}") from e
    if not has_tagger_files(folder):  # a downloader that wrote elsewhere: never run on half a model
        raise CaptioningError(f"the download of {repo_id} left no {MODEL_FILE} / {TAGS_FILE} in {folder}")
    return folder
