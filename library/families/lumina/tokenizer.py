"""The Gemma-2 tokenizer of Lumina-Image 2.0, obtained without network access.

Where it comes from, first match wins:

1. ``--gemma2`` itself when it is a transformers folder holding the tokenizer files
   (``tokenizer.json`` and/or ``tokenizer.model``, as ``google/gemma-2-2b`` ships them);
2. ``--tokenizer_cache_dir DIR``: ``DIR/google_gemma-2-2b`` (the hub id with ``/`` as ``_``);
3. ``google/gemma-2-2b`` already in the local Hugging Face cache (looked up, never downloaded).

Otherwise a one-line :class:`CheckpointError` names the folder expected. The reference downloads
the (gated) hub repository on first use; here the user copies its tokenizer files once.

Captions are right-padded (the DiT's position ids assume it), with Gemma's ``<bos>`` first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from library.families.sd.checkpoint.common import CheckpointError
from library.families.t5_tokenizer import cache_folder_name, hub_cache_folder

logger = logging.getLogger(__name__)

GEMMA2_TOKENIZER_ID = "google/gemma-2-2b"
#: Gemma's fixed special ids
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def tokenizer_folder(gemma2_path: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> Path:
    """The folder the tokenizer is read from (see the module docstring), or ``CheckpointError``."""
    if gemma2_path is not None and Path(gemma2_path).is_dir() and _has_tokenizer(Path(gemma2_path)):
        return Path(gemma2_path)
    folder = Path(cache_dir) / cache_folder_name(GEMMA2_TOKENIZER_ID) if cache_dir is not None else None
    if folder is not None and folder.is_dir():
        if not _has_tokenizer(folder):
            raise CheckpointError(f"Gemma-2 tokenizer folder {folder} has neither tokenizer.json nor tokenizer.model; "
                                  f"copy the tokenizer files of {GEMMA2_TOKENIZER_ID} there")
        return folder
    cached = hub_cache_folder(GEMMA2_TOKENIZER_ID, _TOKENIZER_FILES)
    if cached is not None:
        logger.info("Gemma-2 tokenizer %s found in the local Hugging Face cache", GEMMA2_TOKENIZER_ID)
        return cached
    where = (f"folder {folder} (from --tokenizer_cache_dir) does not exist" if folder is not None
             else "no --tokenizer_cache_dir was given")
    example = folder if folder is not None else Path("DIR") / cache_folder_name(GEMMA2_TOKENIZER_ID)
    raise CheckpointError(f"Gemma-2 tokenizer not found: {where}, --gemma2 is not a folder with tokenizer files and "
                          f"{GEMMA2_TOKENIZER_ID} is not in the local Hugging Face cache; copy tokenizer.json and "
                          f"tokenizer_config.json of {GEMMA2_TOKENIZER_ID} into {example} and pass "
                          f"--tokenizer_cache_dir {example.parent}")


def load_gemma_tokenizer(gemma2_path: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The Gemma tokenizer (right padding), checked to have Gemma's special ids."""
    folder = tokenizer_folder(gemma2_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load a Gemma tokenizer from {folder} ({str(e).splitlines()[0]}); copy the "
                              f"tokenizer files of {GEMMA2_TOKENIZER_ID} there again") from e
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    if ids != (PAD_ID, EOS_ID, BOS_ID):
        raise CheckpointError(f"{folder} is not a Gemma tokenizer: pad/eos/bos ids are {ids}, Gemma has "
                              f"({PAD_ID}, {EOS_ID}, {BOS_ID}); copy the tokenizer files of {GEMMA2_TOKENIZER_ID} "
                              "there")
    tokenizer.padding_side = "right"
    logger.info("loaded the Gemma-2 tokenizer from %s (%d tokens)", folder, len(tokenizer))
    return tokenizer
