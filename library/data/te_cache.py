"""Text-encoder output caching: encode every image's caption once, in memory or as ``.npz`` next to the image.

With the outputs cached the text encoders leave the device for the whole run (they come back only
for sample images), which is what makes SDXL fit on small cards. Only captions that are the same
in every epoch can be cached: :func:`uncacheable_reason` names the subset option that varies them.

Disk cache files are ``<stem><suffix>`` (the family's suffix; ``_te_outputs.npz`` for SDXL, so
``foo.png`` -> ``foo_te_outputs.npz``) holding

* the family's named tensors for ONE sample (``ModelFamily.text_encoder_outputs_to_cache`` without
  the batch dimension; SDXL: ``hidden_state1`` [T,768], ``hidden_state2`` [T,1280], ``pool2``
  [1280]), float32 (bf16 outputs are upcast: npz has no bf16),
* ``caption_sha256``: the sha256 hex digest of the caption the outputs were encoded from (a numpy
  unicode scalar). This is our addition: kohya's files lack it and are accepted as they are.

* the settings the outputs depend on (the family's ``text_encoder_cache_settings``, e.g. FLUX's
  ``apply_t5_attn_mask``, as kohya's files hold it), as 0-dim arrays. They are part of every
  sample's outputs in memory too, so disk and memory samples batch alike.

A file is valid when it exists, is readable, has the current settings, holds every expected key
with the expected per-sample shape (when the caller knows them; the trainer learns them by encoding one caption,
so a changed ``--max_token_length`` re-encodes) and, when it records a caption hash, that hash is
the current caption's: editing one caption re-encodes just that image. ``skip_cache_check``
trusts any existing file (existence only), which saves opening thousands of files on a big
dataset. Files are written atomically, so an interrupted caching run leaves no torn file.

A caption is encoded once however many images share it (DreamBooth class tokens), and each batch
checks that the captions it trains on are the ones the outputs were encoded from.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from library.data.errors import DatasetError
from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

#: captions -> named batched outputs ``{name: [B, ...]}`` (the family's encode + split)
Encode = Callable[[list[str]], Mapping[str, torch.Tensor]]
#: per-sample shape of each output, e.g. ``{"hidden_state1": (77, 768), "pool2": (1280,)}``
Shapes = Mapping[str, tuple[int, ...]]

CAPTION_HASH_KEY = "caption_sha256"

#: subset options that make a caption differ between epochs (or samples), with the "off" value
_VARYING_CAPTION_OPTIONS = ("shuffle_caption", "caption_tag_dropout_rate", "token_warmup_step",
                            "caption_dropout_rate", "caption_dropout_every_n_epochs", "enable_wildcard")


def cache_path(image_path: Path, suffix: str) -> Path:
    """``<folder>/<stem><suffix>`` (suffix ``_te_outputs.npz``: ``foo.png`` -> ``foo_te_outputs.npz``)."""
    return image_path.with_name(image_path.stem + suffix)


def caption_sha256(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def uncacheable_reason(subset) -> str | None:
    """Which caption option of ``subset`` (SubsetParams) changes its captions per sample, or None."""
    for name in _VARYING_CAPTION_OPTIONS:
        value = getattr(subset, name)
        if value:
            return f"{name} is on" if value is True else f"{name} is {value}"
    return None


# ------------------------------------------------------------------------------------- files


def _stored_hash(npz) -> str | None:
    if CAPTION_HASH_KEY not in npz.files:
        return None
    value = npz[CAPTION_HASH_KEY].item()
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def is_cache_valid(path: Path, *, caption: str, expected_shapes: Shapes | None = None,
                   skip_check: bool = False, settings: Mapping[str, bool | float] | None = None) -> bool:
    """Whether ``path`` can be used as is for ``caption`` (see the module docstring)."""
    if not path.is_file():
        return False
    if skip_check:
        return True
    try:
        with np.load(path) as npz:
            stored = _stored_hash(npz)
            if stored is not None and stored != caption_sha256(caption):
                return False  # encoded from another caption: stale
            for key, value in (settings or {}).items():
                if key not in npz.files or npz[key].shape != () or npz[key].item() != value:
                    return False  # encoded with other settings (e.g. without the T5 attention mask)
            if expected_shapes is None:
                return any(key != CAPTION_HASH_KEY for key in npz.files)
            return all(key in npz.files and tuple(npz[key].shape) == tuple(shape)
                       for key, shape in expected_shapes.items())
    except Exception as e:  # a torn or foreign file: encode again and overwrite
        logger.warning("text encoder output cache %s is unreadable (%s); re-encoding", path, e)
        return False


def read_outputs(path: Path) -> dict[str, torch.Tensor]:
    """The per-sample tensors of a cache file (every key but the caption hash); errors name the file."""
    try:
        with np.load(path) as npz:
            return {key: torch.from_numpy(npz[key]) for key in npz.files if key != CAPTION_HASH_KEY}
    except Exception as e:
        raise DatasetError(f"cannot read text encoder output cache {path}: {e} -- delete it to re-encode") from e


def write_outputs(path: Path, outputs: Mapping[str, torch.Tensor], *, caption: str) -> None:
    """Write one sample's outputs as float32 plus the caption hash, atomically."""
    # Flags and masks stay bool (what kohya's files hold); everything else is float32.
    arrays = {key: value.detach().cpu().numpy() if value.dtype == torch.bool else value.detach().float().cpu().numpy()
              for key, value in outputs.items()}
    arrays[CAPTION_HASH_KEY] = np.array(caption_sha256(caption))
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


# ------------------------------------------------------------------------------------ caching


@dataclass
class _Job:
    """One caption to encode, shared by every ImageInfo trained with exactly that caption."""

    caption: str
    files: dict[Path, list] = field(default_factory=dict)  # cache file -> the ImageInfos reading it
    memory: list = field(default_factory=list)  # ImageInfos keeping the outputs in memory

    @property
    def infos(self) -> list:
        return [i for infos in self.files.values() for i in infos] + self.memory


def _plan(items: Iterable[tuple], *, to_disk: bool, suffix: str) -> list[_Job]:
    """Jobs by caption; an image whose file another caption owns is cached in memory (warned)."""
    jobs: dict[str, _Job] = {}
    file_caption: dict[Path, str] = {}
    for info, caption in items:
        if info.has_cached_text_encoder_outputs and info.text_encoder_caption == caption:
            continue  # done by an earlier call (e.g. before a multi-process barrier)
        job = jobs.setdefault(caption, _Job(caption))
        if not to_disk:
            job.memory.append(info)
            continue
        path = cache_path(info.path, suffix)
        owner = file_caption.setdefault(path, caption)
        if owner == caption:
            job.files.setdefault(path, []).append(info)
        else:  # one file holds one caption: the image used with another caption stays in memory
            logger.warning("%s is trained with two captions (%r and %r); the second one's text encoder "
                           "outputs are cached in memory only", info.path, owner, caption)
            job.memory.append(info)
    return list(jobs.values())


def _use_file(path: Path, infos: list, caption: str) -> None:
    for info in infos:
        info.text_encoder_outputs, info.text_encoder_outputs_npz, info.text_encoder_caption = None, path, caption


def cache_text_encoder_outputs(items: list[tuple], encode: Encode, *, batch_size: int = 1, to_disk: bool = False,
                               skip_cache_check: bool = False, suffix: str,
                               expected_shapes: Shapes | None = None, process_index: int = 0,
                               num_processes: int = 1, settings: Mapping[str, bool | float] | None = None) -> int:
    """Fill the text-encoder output cache of ``items`` ((ImageInfo, caption) pairs); returns how many
    captions were encoded.

    ``encode(captions) -> {name: [B, ...]}`` is the family's text encoding split into named
    tensors; it is called under whatever grad/autocast context the caller set. With ``to_disk``
    and several processes, this process only encodes the captions of the missing files with
    ``caption index % num_processes == process_index``; call again with the defaults after a
    barrier to pick up all files (captions cached in memory are not encoded twice). ``settings``
    are stored with every sample's outputs (see the module docstring).
    """
    if batch_size < 1:
        raise DatasetError(f"--text_encoder_batch_size must be >= 1 (got {batch_size})")
    todo: list[_Job] = []
    for n, job in enumerate(_plan(items, to_disk=to_disk, suffix=suffix)):
        for path in list(job.files):
            if is_cache_valid(path, caption=job.caption, expected_shapes=expected_shapes,
                              skip_check=skip_cache_check, settings=settings):
                _use_file(path, job.files.pop(path), job.caption)
        if num_processes > 1 and n % num_processes != process_index:
            job.files.clear()  # another process writes these; picked up by the call after the barrier
        if job.files or job.memory:
            todo.append(job)
    if not todo:
        return 0
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for chunk in tqdm(chunks, desc="caching text encoder outputs", smoothing=0):
        outputs = _encode_checked(encode, chunk)
        fixed = {key: torch.tensor(value) for key, value in (settings or {}).items()}
        for k, job in enumerate(chunk):
            _store(job, {**{key: value[k].clone() for key, value in outputs.items()}, **fixed})
    return len(todo)


def probe_shapes(encode: Encode) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each output, from encoding one empty caption: what a valid file must hold.

    The shapes follow the settings (e.g. ``--max_token_length``), so files from a run with other
    settings are re-encoded rather than failing in the middle of training.
    """
    outputs = checked_outputs(encode([""]), 1)
    return {key: tuple(value.shape[1:]) for key, value in outputs.items()}


def checked_outputs(outputs, count: int) -> dict[str, torch.Tensor]:
    """``outputs`` of ``encode`` for ``count`` captions, detached on the CPU; a wrong form raises ValueError."""
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(f"text encoder output caching: encode returned {type(outputs).__name__}, expected a "
                         "non-empty dict of named [B, ...] tensors (ModelFamily.text_encoder_outputs_to_cache)")
    out: dict[str, torch.Tensor] = {}
    for key, value in outputs.items():
        if key == CAPTION_HASH_KEY:
            raise ValueError(f"text encoder output caching: the name {CAPTION_HASH_KEY!r} is reserved for the "
                             "caption hash of the cache file; rename that output")
        if not isinstance(value, torch.Tensor) or value.ndim < 1 or value.shape[0] != count:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"text encoder output caching: output {key!r} is {shape} for {count} "
                             "captions; every output must be a tensor [B, ...] with B = the number of captions")
        out[key] = value.detach().cpu()
    return out


def _encode_checked(encode: Encode, chunk: list[_Job]) -> dict[str, torch.Tensor]:
    out = checked_outputs(encode([job.caption for job in chunk]), len(chunk))
    for k, job in enumerate(chunk):
        bad = [key for key, value in out.items() if bool(torch.isnan(value[k]).any())]
        if bad:
            names = ", ".join(str(info.path) for info in job.infos[:3])
            raise DatasetError(f"the text encoders produced NaN outputs ({', '.join(bad)}) for the caption "
                               f"{job.caption!r} of {names}: with --mixed_precision fp16 try bf16")
    return out


def _store(job: _Job, outputs: dict[str, torch.Tensor]) -> None:
    for path, infos in job.files.items():
        write_outputs(path, outputs, caption=job.caption)
        _use_file(path, infos, job.caption)
    for info in job.memory:
        info.text_encoder_outputs, info.text_encoder_outputs_npz = outputs, None
        info.text_encoder_caption = job.caption


# ------------------------------------------------------------------------------------ batches


def batch_outputs(members: list, captions: list[str], *, where: str) -> dict[str, torch.Tensor]:
    """The cached outputs of a batch's ImageInfos stacked to ``{name: [B, ...]}``.

    ``captions`` are the captions the batch trains on: each must be the one its outputs were
    encoded from (otherwise the conditioning would silently belong to another text).
    """
    per_sample = []
    for info, caption in zip(members, captions):
        if caption != info.text_encoder_caption:
            raise DatasetError(f"{where}: the caption of {info.path} is {caption!r} but its text encoder outputs "
                               f"were cached for {info.text_encoder_caption!r}: captions must not change after "
                               "caching (turn off what varies them, or do not cache text encoder outputs)")
        per_sample.append(info.text_encoder_outputs if info.text_encoder_outputs is not None
                          else read_outputs(info.text_encoder_outputs_npz))
    first_info, first = members[0], per_sample[0]
    for info, outputs in zip(members[1:], per_sample[1:]):
        shapes = {key: tuple(value.shape) for key, value in outputs.items()}
        expected = {key: tuple(value.shape) for key, value in first.items()}
        if shapes != expected:
            raise DatasetError(f"{where}: cached text encoder outputs of {info.path} ({shapes}) do not match those "
                               f"of {first_info.path} ({expected}) in the same batch: stale cache files (e.g. "
                               "another --max_token_length); delete them, or re-run without --skip_cache_check")
    return {key: torch.stack([outputs[key] for outputs in per_sample]) for key in first}
