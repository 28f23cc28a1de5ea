"""Reading safetensors checkpoints: the file set, the headers, and one tensor at a time.

Headers are parsed here rather than trusted to safetensors so that a truncated or corrupt file, a
shard missing from disk, or a tensor the index promises but the shard lacks each fail before any
weight is read, with a message that names the file and the tensor.

Tensors are read with plain positional reads into a fresh tensor, not through a memory map: a map
would make the same copy, but every page it touched would stay in the process's resident set until
the map is closed, so loading (or quantizing) would hold the file's pages and the copies at once,
twice the model. Reads still come from the page cache, so a second run starts without disk I/O.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ernie_cli.errors import ErnieError
from ernie_cli.weights.files import INDEX_FILE, SINGLE_FILE

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute file position of the first data byte (for plain reads without a memory map)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one .safetensors file, checked against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ErnieError(f"{path} is truncated ({size} bytes, no header): re-download it.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _HEADER_LIMIT or 8 + header_len > size:
                raise ErnieError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes in a {size}-byte file): re-download it.")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if isinstance(exc, OSError) and not path.exists():
            raise ErnieError(f"{path} is missing: re-download the model.") from None
        raise ErnieError(f"{path} is corrupt ({exc.__class__.__name__}): re-download it.") from None
    if not isinstance(header, dict):
        raise ErnieError(f"{path} has a corrupt header: re-download it.")
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ErnieError(f"{path}: tensor {name} has a corrupt or unsupported header entry: re-download the file.") from None
        info = TensorInfo(path, dtype, shape, 8 + header_len + begin)
        if end - begin != info.nbytes or begin < 0:
            raise ErnieError(f"{path}: tensor {name} has inconsistent offsets in the header: re-download the file.")
        if end > data_size:
            raise ErnieError(f"{path} is truncated: tensor {name} ends at byte {end} but the file holds {data_size} bytes of data; re-download it.")
        tensors[name] = info
    return tensors


def byte_view(t: torch.Tensor):
    """A writable view of a contiguous CPU tensor's bytes (no copy, no numpy)."""
    return (ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())


class TensorReader:
    """Tensors of a Checkpoint: copied out with plain positional reads (safe from several threads),
    or, with `map`, seen in place through a memory map of their file."""

    def __init__(self, ckpt: "Checkpoint"):
        self.tensors = ckpt.tensors
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, torch.Tensor | bool] = {}  # False: the file could not be mapped
        self._lock = threading.Lock()

    def map(self, name: str) -> torch.Tensor:
        """The tensor `name` as a view into its file, mapped copy-on-write (and never written): no
        copy is made and its pages stay the page cache's. A model used as stored (the CPU's native
        int kernels read the file layout) then takes no memory beside the cache, so a second run
        starts from memory instead of re-reading 12 GB. Bytes not aligned for their dtype are read."""
        info = self.tensors[name]
        if not info.nbytes or info.offset % info.dtype.itemsize:
            return self.read(name)
        with self._lock:
            whole = self._maps.get(info.file)
            if whole is None:
                try:
                    whole = torch.from_file(str(info.file), shared=False, size=info.file.stat().st_size, dtype=torch.uint8)
                except (RuntimeError, OSError):  # a file system that cannot map: read it instead
                    whole = False
                self._maps[info.file] = whole
        if whole is False:
            return self.read(name)
        return whole[info.offset : info.offset + info.nbytes].view(info.dtype).view(list(info.shape))

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`; with rows=(begin, end), only those rows of it seen as a matrix [-1, last dim]."""
        info = self.tensors[name]
        shape: list[int] = list(info.shape)
        offset, nbytes = info.offset, info.nbytes
        if rows is not None:
            begin, end = rows
            row_bytes = shape[-1] * info.dtype.itemsize if shape else nbytes
            offset += begin * row_bytes
            nbytes = (end - begin) * row_bytes
            shape = [end - begin, shape[-1]]
        out = torch.empty(nbytes, dtype=torch.uint8)
        self._pread(name, out, offset)
        return out.view(info.dtype).view(shape)

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Bytes start..start+len(out) of tensor `name` into `out`, a contiguous uint8 CPU tensor
        (a pinned staging buffer: weights/staging.py)."""
        info = self.tensors[name]
        if start + out.numel() > info.nbytes:
            raise ValueError(f"{name}: bytes {start}..{start + out.numel()} are past its {info.nbytes}")
        self._pread(name, out, info.offset + start)

    def _pread(self, name: str, out: torch.Tensor, offset: int) -> None:
        nbytes = out.numel()
        if not nbytes:
            return
        info = self.tensors[name]
        fd = self._fd(info.file)
        view = memoryview(byte_view(out)).cast("B")
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                raise ErnieError(f"{info.file}: tensor {name} ends early (the file was truncated while reading); re-download the file.")
            got += n

    def close(self) -> None:
        """Closes the files; mapped views stay valid for as long as they are used."""
        with self._lock:
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class Checkpoint:
    """Every tensor of a model directory, checked up front and read one at a time on demand."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        promised = self._index_map()
        headers = {f: read_header(f) for f in self.files}
        for f, table in headers.items():
            self.tensors.update(table)
        for name, file in promised.items():
            info = self.tensors.get(name)
            if info is None or info.file != file:
                raise ErnieError(f"{file} does not hold tensor {name}, which {INDEX_FILE} says it does: re-download the model.")
        self._reader = TensorReader(self)

    def _index_map(self) -> dict[str, Path]:
        index = self.dir / INDEX_FILE
        if not index.is_file():
            return {}
        data = json.loads(index.read_text(encoding="utf-8"))
        return {name: self.dir / shard for name, shard in data["weight_map"].items()}

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                shards = sorted(set(data["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ErnieError(f"{index} is corrupt ({exc.__class__.__name__}): re-download the model.") from None
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise ErnieError(f"shard {missing[0]} named in {index} is missing ({len(missing)} of {len(shards)} shards absent): re-download the model.")
            return [self.dir / s for s in shards]
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return [single]
        found = sorted(self.dir.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise ErnieError(f"{self.dir} has no {SINGLE_FILE} or {INDEX_FILE}: it holds no safetensors weights; download the model with `ernie download`.")

    @property
    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    @property
    def reader(self) -> TensorReader:
        return self._reader

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`; with rows=(begin, end), only those rows of it seen as [-1, last dim]."""
        return self._reader.read(name, rows)

    def close(self) -> None:
        self._reader.close()
