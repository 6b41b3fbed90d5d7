"""The CLIP tokenizer of SD 1.x/2.x, obtained without network access.

Where it comes from, first match wins:

1. ``--tokenizer_cache_dir DIR``: ``DIR/<hub id with / as _>`` (``openai_clip-vit-large-patch14``
   for SD1, ``stabilityai_stable-diffusion-2`` for SD2), the folder layout the reference scripts
   write. When DIR is given but that folder is missing, the tokenizer is built (3.) and saved there,
   so the next run loads it.
2. The ``tokenizer/`` subfolder of a Diffusers model folder.
3. Built from the BPE vocabulary that the ``open_clip`` package ships
   (``bpe_simple_vocab_16e6.txt.gz``): the same vocabulary and merges as OpenAI's CLIP, hence the
   same token ids as the hub tokenizers.

SD1 and SD2 tokenizers differ only in padding: SD1 pads with ``<|endoftext|>`` (id 49407), SD2
with ``!`` (id 0). Both are 77 tokens long.

The text normalisation is the transformers ``CLIPTokenizer`` one (NFC, whitespace collapsed,
lower case), as the hub tokenizers use today; it does not run ``ftfy`` or unescape HTML entities
as ``open_clip``'s ``SimpleTokenizer`` does, so text with curly quotes, ligatures or ``&amp;``
tokenises differently there. Vocabulary, merges and word splitting are identical.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

SD1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
SD2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
#: SDXL's second tokenizer (OpenCLIP bigG): the SD2 tokenizer (``!`` padding) under another hub id
SDXL_TOKENIZER2_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SD1_PAD, SD2_PAD = EOS, "!"
# 49408 = 512 byte symbols (with and without </w>) + merges + 2 specials.
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


def hub_id(v2: bool) -> str:
    """The hub id whose tokenizer SD1 (False) or SD2 (True) uses."""
    return SD2_TOKENIZER_ID if v2 else SD1_TOKENIZER_ID


def cache_folder_name(repo_id: str) -> str:
    """``--tokenizer_cache_dir`` sub-folder for a hub id: ``/`` replaced by ``_``."""
    return repo_id.replace("/", "_")


def open_clip_bpe_path() -> Path:
    """The BPE merges file shipped inside the installed ``open_clip`` package."""
    # Located, not imported: importing open_clip pulls in timm and its models (about a second).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - open_clip_torch is a requirement
        raise RuntimeError("building the CLIP tokenizer offline needs the open_clip_torch package: "
                           "pip install open_clip_torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed open_clip package; reinstall open_clip_torch "
                           f"or pass --tokenizer_cache_dir with a saved tokenizer")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character for each of the 256 byte values.

    Printable Latin-1 bytes stand for themselves (in byte order); the other bytes are given the
    code points 256, 257, ... in byte order, and appended after them.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def _vocabulary_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    # The first line is a version header; CLIP uses the first 48894 merges only.
    merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise RuntimeError(f"{open_clip_bpe_path()} gave {len(set(tokens))} distinct tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(*, v2: bool) -> CLIPTokenizer:
    """The SD1 (``v2=False``) or SD2 (``v2=True``) CLIP tokenizer, built from open_clip's BPE file."""
    vocab, merges = _vocabulary_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), bos_token=BOS, eos_token=EOS, unk_token=EOS,
                         pad_token=SD2_PAD if v2 else SD1_PAD, model_max_length=MAX_LENGTH)


def _save_atomically(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Save into a temporary sibling and rename, so concurrent processes never see half a folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        # Another process saved it first; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_clip_tokenizer(*, v2: bool, cache_dir: str | os.PathLike | None = None,
                        diffusers_dir: str | os.PathLike | None = None, repo_id: str | None = None,
                        subfolder: str = "tokenizer") -> CLIPTokenizer:
    """The SD1/SD2 CLIP tokenizer from ``cache_dir`` (built and saved there if absent), else the
    ``subfolder`` of the Diffusers folder ``diffusers_dir``, else built from open_clip's BPE.

    ``v2`` chooses the padding (``!`` when True); ``repo_id`` names the cache sub-folder when it is
    not SD1's/SD2's hub id (SDXL's second tokenizer: :data:`SDXL_TOKENIZER2_ID`, ``tokenizer_2``).
    """
    repo_id = repo_id or hub_id(v2)
    if cache_dir is not None:
        folder = Path(cache_dir) / cache_folder_name(repo_id)
        if not folder.is_dir():
            logger.info("tokenizer cache %s not found: building the %s tokenizer there", folder, repo_id)
            _save_atomically(build_clip_tokenizer(v2=v2), folder)
        logger.info("loading tokenizer from %s", folder)
        return _load_folder(folder)
    if diffusers_dir is not None and (Path(diffusers_dir) / subfolder).is_dir():
        logger.info("loading tokenizer from %s", Path(diffusers_dir) / subfolder)
        return _load_folder(Path(diffusers_dir) / subfolder)
    return build_clip_tokenizer(v2=v2)


def _load_folder(folder: Path) -> CLIPTokenizer:
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load a CLIP tokenizer from {folder} ({e}); delete the folder to have it "
                           f"rebuilt, or point --tokenizer_cache_dir elsewhere") from e
    if len(tokenizer) < VOCAB_SIZE:
        raise RuntimeError(f"tokenizer in {folder} has {len(tokenizer)} tokens, a CLIP tokenizer has {VOCAB_SIZE}; "
                           f"delete the folder to have it rebuilt")
    return tokenizer
