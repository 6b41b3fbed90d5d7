"""Writing files so that an interrupted run never leaves a half-written one, and file hashes.

Every output of the toolkit (LoRA files, checkpoints, caches, metadata) goes through
:func:`atomic_path`: the data is written to a temporary file in the same folder and renamed over
the target only once complete, so a kill at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are written, so flag parsing stays fast
    import torch


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any worker threads exist.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class WriteError(OSError):
    """An output file could not be written (full disk, no permission, a folder that cannot be made).

    The message names the file the user asked for (never the temporary name) and the fix; the
    previous version of the file, if any, is untouched.
    """

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


#: errno values that mean "no room": the disk or the user's quota is full
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    # safetensors (Rust) reports I/O errors as SafetensorError text, e.g. "... No space left on device ..."
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded"))


def _write_error(target: Path, error: BaseException) -> WriteError:
    if _is_disk_full(error):
        return WriteError(errno.ENOSPC, f"cannot write {target}: the disk is full (No space left on device); "
                                        f"nothing was replaced. Free space on that disk or choose another output "
                                        f"folder, then run again")
    reason = getattr(error, "strerror", None) or str(error)
    return WriteError(getattr(error, "errno", None) or errno.EIO,
                      f"cannot write {target} ({reason}); choose a folder you can write to")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``target``; rename it over ``target`` if the block succeeds.

    The temporary name keeps the target's suffix because some writers (numpy's ``savez``,
    safetensors) look at it. A full disk, or a folder that cannot be created or written, raises
    :class:`WriteError` naming ``target``; the temporary file is removed and an existing ``target``
    is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    except OSError as e:
        raise _write_error(target, e) from e
    os.close(fd)
    # mkstemp makes the file owner-only (0600); give it the mode a plain open() would (0666 - umask),
    # so saved models stay readable by the user's other tools and accounts as before.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if not isinstance(e, WriteError) and isinstance(e, Exception) and (
                _is_disk_full(e) or isinstance(e, PermissionError)):
            raise _write_error(target, e) from e
        raise


def save_safetensors(state_dict: dict[str, "torch.Tensor"], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, metadata values strings)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_torch(obj, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` an object (used for ``.ckpt``/``.pt`` outputs)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --- hashes ------------------------------------------------------------------------------------

def addnet_hashes(state_dict: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> tuple[str, str]:
    """The two hashes sd-webui-additional-networks shows for a LoRA file.

    Computed on the in-memory safetensors serialization carrying only the ``ss_*`` metadata, as
    that extension does: ``sshs_model_hash`` is the sha256 of the tensor data (header skipped),
    ``sshs_legacy_hash`` the first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB.
    """
    from safetensors.torch import save as safetensors_bytes

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    blob = safetensors_bytes(tensors, metadata=ss_only)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _sha256_of(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)  # releases the GIL for large blocks: a background hash runs beside the main thread
    return h.hexdigest()


class _BackgroundHash(threading.Thread):
    def __init__(self, path: str) -> None:
        # daemon: a run that fails before it needs the hash exits at once instead of waiting for it
        super().__init__(name=f"sha256 {os.path.basename(path)}", daemon=True)
        self.path, self.result, self.error = path, None, None
        self.stamp = _file_stamp(path)

    def run(self) -> None:
        try:
            self.result = _sha256_of(self.path)
        except OSError as e:
            self.error = e


_background: dict[str, _BackgroundHash] = {}


def _file_stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def prefetch_sha256(path: str | os.PathLike) -> None:
    """Start hashing ``path`` in a background thread; :func:`sha256_file` of the same file then
    waits for that result instead of reading it again. The full SHA-256 of a multi-GB checkpoint
    (``ss_new_sd_model_hash``) takes seconds: started before the models load, it overlaps loading
    and latent caching instead of delaying the first training step."""
    key = os.path.realpath(path)
    if key not in _background and os.path.isfile(key):
        _background[key] = job = _BackgroundHash(key)
        job.start()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the whole file (a :func:`prefetch_sha256` result when one is running or done,
    unless the file changed since)."""
    key = os.path.realpath(path)
    job = _background.pop(key, None)
    if job is not None:
        job.join()
        if job.error is None and job.stamp == _file_stamp(key):
            return job.result
    return _sha256_of(key)


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB of the file."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]

