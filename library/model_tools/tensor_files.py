"""Checkpoint files one tensor at a time: a reader and an incremental, atomic ``.safetensors`` writer.

Merging or converting a multi-GB checkpoint must not hold it twice (once read, once merged or
serialized). :func:`open_tensor_file` lists a file's tensors (name, dtype, shape) from its header
and reads one tensor when asked; :class:`SafetensorsWriter` writes the header first (every tensor's
dtype and shape is known up front) and then each tensor's bytes as it comes, into a temporary file
renamed over the target at the end (:func:`library.io_utils.atomic_path`).

``.safetensors`` tensors are read with ordinary file reads at the offsets the header gives, not
through a memory map: the pages of a mapped file count towards the process's resident memory
until the kernel reclaims them, so a map would make a streaming pass look (and, under memory
pressure, behave) as if the whole file were loaded. ``.ckpt``/``.pt`` pickles cannot be read
piecewise; they are memory-mapped by ``torch.load(mmap=True)`` when saved in the zip format
(torch >= 1.6), and loaded whole otherwise.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length
``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`` padded with spaces, then the tensors' little-endian bytes, each at
``8 + N + begin``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "TensorInfo", "TensorFileError", "TensorFile", "SafetensorsFile", "TorchFile", "open_tensor_file",
    "SafetensorsWriter", "write_safetensors", "iter_tensors", "DTYPE_NAMES", "dtype_from_name",
    "read_safetensors_header",
]

#: torch dtype -> safetensors dtype name
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = _code
_DTYPES = {code: dtype for dtype, code in DTYPE_NAMES.items()}

#: a header larger than this is not a safetensors header (the format caps it at 100 MB)
_MAX_HEADER = 100_000_000
_ALIGN = 8


class TensorFileError(ValueError):
    """A file that is not a readable checkpoint; the message names it."""


def dtype_from_name(code: str, path: object = "file") -> torch.dtype:
    try:
        return _DTYPES[code]
    except KeyError:
        raise TensorFileError(f"{path}: tensor dtype {code!r} is not supported by this torch build") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def meta(self) -> torch.Tensor:
        """A ``meta`` tensor of this dtype and shape (shape-only stand-in, no memory)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header JSON, offset of the data section)`` of a ``.safetensors`` file."""
    path = Path(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TensorFileError(f"{path}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER:
            raise TensorFileError(f"{path}: not a safetensors file (header length {size})")
        raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TensorFileError(f"{path}: not a safetensors file (unreadable header); an interrupted download or "
                              f"copy leaves such files") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: not a safetensors file (unexpected header)")
    return header, 8 + size


class TensorFile:
    """Tensors of one checkpoint, read one at a time. Use as a context manager."""

    path: Path
    metadata: dict[str, str]

    def infos(self) -> list[TensorInfo]:
        """Every tensor, in the order reading them is cheapest (file order)."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return [info.name for info in self.infos()]

    def info(self, name: str) -> TensorInfo:
        return self._by_name()[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name()

    def _by_name(self) -> dict[str, TensorInfo]:
        cached = getattr(self, "_index", None)
        if cached is None:
            cached = {info.name: info for info in self.infos()}
            self._index = cached
        return cached

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: meta tensor}``: what shape readers (the families' ``infer_*_shape``) need."""
        return {info.name: info.meta() for info in self.infos()}

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    """A ``.safetensors`` file read with plain reads at the header's offsets (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header, self._data_start = read_safetensors_header(self.path)
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        entries = []
        for name, entry in header.items():
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                shape = tuple(int(s) for s in entry["shape"])
                info = TensorInfo(name, dtype_from_name(entry["dtype"], self.path), shape)
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, TensorFileError):
                    raise
                raise TensorFileError(f"{self.path}: malformed header entry for {name!r}") from None
            if end - begin != info.nbytes:
                raise TensorFileError(f"{self.path}: {name} has {end - begin} bytes for shape {list(info.shape)} "
                                      f"({info.dtype}); the file is damaged")
            entries.append((begin, end, info))
        entries.sort(key=lambda e: e[0])
        self._entries = {info.name: (begin, end) for begin, end, info in entries}
        self._infos = [info for _, _, info in entries]
        self._file = open(self.path, "rb")

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def get(self, name: str) -> torch.Tensor:
        begin, end = self._entries[name]
        info = self.info(name)
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        view = memoryview(buffer.numpy())
        read = 0
        while read < len(view):
            n = self._file.readinto(view[read:])
            if not n:
                raise TensorFileError(f"{self.path}: file ends inside {name}; it is truncated")
            read += n
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()


class TorchFile(TensorFile):
    """A ``.ckpt``/``.pt``/``.bin`` torch pickle: memory-mapped when possible (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata = {}
        try:
            loaded = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # old (non-zip) pickle, or objects besides tensors: the families' full reader
            from library.families.sd.checkpoint import CheckpointError
            from library.families.sd.loading import read_checkpoint

            try:
                self._tensors = read_checkpoint(self.path)
            except CheckpointError as e:
                raise TensorFileError(str(e)) from None
        else:
            if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict):
                raise TensorFileError(f"{self.path}: holds a {type(loaded).__name__}, not a state dict")
            self._tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        self._infos = [TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in self._tensors.items()]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """A :class:`TensorFile` for a ``.safetensors`` file or a torch pickle (by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() == ".safetensors":
        return SafetensorsFile(path)
    return TorchFile(path)


class SafetensorsWriter:
    """Write a ``.safetensors`` file tensor by tensor, in the order of ``layout``, atomically.

    ``layout`` lists every tensor (name, dtype, shape) up front, so the header can be written first;
    :meth:`write` then takes each tensor in that order (dtype and shape checked). The file appears
    under its name only when :meth:`close` (or leaving the ``with`` block) finds every tensor
    written; an error or interruption leaves no file (nor an old one damaged).
    """

    def __init__(self, path: str | os.PathLike, layout: Sequence[TensorInfo],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._layout = list(layout)
        names = [info.name for info in self._layout]
        if len(set(names)) != len(names):
            raise ValueError("SafetensorsWriter: duplicate tensor names in the layout")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for info in self._layout:
            if info.dtype not in DTYPE_NAMES:
                raise TensorFileError(f"{self.path}: cannot store {info.name} as {info.dtype} in safetensors")
            header[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % _ALIGN)
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0
        self._closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise ValueError(f"SafetensorsWriter: {name} is not in the layout (all tensors already written)")
        info = self._layout[self._next]
        if name != info.name:
            raise ValueError(f"SafetensorsWriter: expected {info.name} next, got {name}")
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(f"SafetensorsWriter: {name} is {tensor.dtype} {list(tensor.shape)}, the header says "
                             f"{info.dtype} {list(info.shape)}")
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file: rename it into place if complete (raises otherwise, leaving no file)."""
        if self._closed:
            return
        self._closed = True
        if self._next != len(self._layout):
            missing = self._layout[self._next].name
            error = ValueError(f"SafetensorsWriter: {len(self._layout) - self._next} tensor(s) not written "
                               f"(next: {missing}); {self.path} is not created")
            self._stack.__exit__(type(error), error, None)
            raise error
        self._stack.close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            error = RuntimeError("aborted")
            self._stack.__exit__(type(error), error, None)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write in-memory tensors through :class:`SafetensorsWriter` (no serialized copy of the whole dict)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    layout = [TensorInfo(name, t.dtype, tuple(t.shape)) for name, t in items]
    with SafetensorsWriter(path, layout, metadata) as writer:
        for name, t in items:
            writer.write(name, t)


def iter_tensors(file: TensorFile) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    for info in file.infos():
        yield info, file.get(info.name)
