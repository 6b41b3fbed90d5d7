"""The T5 tokenizer (FLUX.1, SD3), obtained without network access.

Where it comes from, first match wins:

1. ``--tokenizer_cache_dir DIR``: ``DIR/google_t5-v1_1-xxl`` (the hub id with ``/`` as ``_``), a
   folder as ``save_pretrained`` writes it: ``tokenizer.json`` and/or the sentencepiece model
   ``spiece.model`` (plus ``tokenizer_config.json`` / ``special_tokens_map.json``).
2. The hub id already in the local Hugging Face cache (looked up with
   ``huggingface_hub.try_to_load_from_cache``: never downloads).

Otherwise a one-line error names the folder expected and how to fill it. Unlike CLIP's, the T5
vocabulary cannot be rebuilt from an installed package: the user provides it.

transformers 5 has one T5 tokenizer class (``T5Tokenizer``, backed by the ``tokenizers`` library;
``T5TokenizerFast`` is the same class). From ``tokenizer.json`` it needs nothing else; from a
folder with only ``spiece.model`` it converts the sentencepiece model, which needs the
``protobuf`` package (checked here, because transformers would otherwise fall back to a TikToken
reader with only a warning).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from transformers import T5Tokenizer

logger = logging.getLogger(__name__)

T5_TOKENIZER_ID = "google/t5-v1_1-xxl"
#: T5's fixed special ids (sentencepiece trained with pad 0, eos 1, unk 2).
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def cache_folder_name(hub_id: str) -> str:
    """``--tokenizer_cache_dir`` sub-folder for a hub id: ``/`` replaced by ``_``."""
    return hub_id.replace("/", "_")


def load_t5_tokenizer(cache_dir: str | os.PathLike | None, *, hub_id: str = T5_TOKENIZER_ID) -> T5Tokenizer:
    """The T5 tokenizer from ``<cache_dir>/<hub id with _>`` or the local hub cache (see the module doc).

    Raises ``FileNotFoundError`` (one line: the folder expected, how to fill it) when neither has
    it, ``RuntimeError`` when the folder is there but unreadable or needs ``protobuf``.
    """
    folder = Path(cache_dir) / cache_folder_name(hub_id) if cache_dir is not None else None
    if folder is not None and folder.is_dir():
        return _load_folder(folder)
    cached = hub_cache_folder(hub_id)
    if cached is not None:
        logger.info("T5 tokenizer %s found in the local Hugging Face cache", hub_id)
        return _load_folder(cached)
    where = (f"folder {folder} (from --tokenizer_cache_dir) does not exist" if folder is not None
             else "no --tokenizer_cache_dir was given")
    example = folder if folder is not None else Path("DIR") / cache_folder_name(hub_id)
    raise FileNotFoundError(f"T5 tokenizer not found: {where} and {hub_id} is not in the local Hugging Face cache; "
                            f"copy the tokenizer files of {hub_id} (spiece.model and/or tokenizer.json, "
                            f"tokenizer_config.json) into {example} and pass --tokenizer_cache_dir "
                            f"{example.parent}")


def hub_cache_folder(hub_id: str, file_names: tuple[str, ...] = ("tokenizer.json", "spiece.model")) -> Path | None:
    """The cached snapshot folder of ``hub_id`` holding one of ``file_names``, or None; looks only
    at the local cache (nothing is downloaded). Here it keeps transformers 5 from building an
    empty-vocabulary T5 tokenizer when nothing is found, instead of failing."""
    from huggingface_hub import try_to_load_from_cache

    for name in file_names:
        try:
            found = try_to_load_from_cache(hub_id, name)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def _load_folder(folder: Path) -> T5Tokenizer:
    has_json = (folder / "tokenizer.json").is_file()
    has_spm = (folder / "spiece.model").is_file()
    if not has_json and not has_spm:
        raise RuntimeError(f"T5 tokenizer folder {folder} has neither tokenizer.json nor spiece.model; copy the "
                           f"tokenizer files of {T5_TOKENIZER_ID} there")
    if not has_json and importlib.util.find_spec("google.protobuf") is None:
        raise RuntimeError(f"T5 tokenizer folder {folder} has only spiece.model, and reading it needs the protobuf "
                           f"package: pip install protobuf (or add the tokenizer.json of {T5_TOKENIZER_ID})")
    try:
        tokenizer = T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise RuntimeError(f"cannot load a T5 tokenizer from {folder} ({str(e).splitlines()[0]}); copy the "
                           f"tokenizer files of {T5_TOKENIZER_ID} there again") from e
    logger.info("loaded T5 tokenizer from %s", folder)
    return _checked(tokenizer, folder)


def _checked(tokenizer: T5Tokenizer, source: object) -> T5Tokenizer:
    """Refuse a tokenizer without T5's special ids (a CLIP/BPE tokenizer saved under the T5 name,
    or a sentencepiece model that failed to convert)."""
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:
        raise RuntimeError(f"{source}: the T5 tokenizer has no vocabulary besides its special tokens; copy the "
                           f"tokenizer files of {T5_TOKENIZER_ID} (spiece.model or tokenizer.json) there")
    if ids != (PAD_ID, EOS_ID, UNK_ID) or tokenizer.convert_ids_to_tokens(EOS_ID) != "</s>":
        raise RuntimeError(f"{source} is not a T5 tokenizer: pad/eos/unk ids are {ids}, T5 has "
                           f"({PAD_ID}, {EOS_ID}, {UNK_ID}) with eos '</s>'; copy the tokenizer files of "
                           f"{T5_TOKENIZER_ID} there")
    return tokenizer
