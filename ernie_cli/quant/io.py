"""Plain reads and streamed writes of safetensors files, with bounded memory.

Reading: `TensorReader` copies one tensor (or a run of its leading rows) straight from the file
into a fresh tensor with ordinary reads. A memory map would do the same copy, but every page it
touched would stay in the process's resident set until the map is closed: quantizing a 43.7 GB
checkpoint through maps makes the RSS climb towards the size of a whole source shard.

Writing: `ShardWriter` is told every output tensor's name, dtype and shape up front (the quantized
layout is known before any weight is read), so it splits them into shards and writes each shard's
header first; each tensor's bytes then go to disk the moment they are produced. Nothing waits in
memory for a shard to fill.
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

from ernie_cli.checkpoint import INDEX_FILE, Checkpoint
from ernie_cli.errors import ErnieError

ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def _buffer(t: torch.Tensor):
    """A writable view of a contiguous CPU tensor's bytes (no copy, no numpy)."""
    return (ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())


class TensorReader:
    """Tensors of a Checkpoint, read with plain positional reads (no memory map; safe from several threads)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`; with rows=(begin, end), only those rows of it seen as a matrix [-1, last dim]."""
        info = self.ckpt.tensors[name]
        shape: list[int] = list(info.shape)
        offset, nbytes = info.offset, info.nbytes
        if rows is not None:
            begin, end = rows
            row_bytes = shape[-1] * info.dtype.itemsize if shape else nbytes
            offset += begin * row_bytes
            nbytes = (end - begin) * row_bytes
            shape = [end - begin, shape[-1]]
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            fd = self._fd(info.file)
            view = memoryview(_buffer(out)).cast("B")
            got = 0
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if not n:
                    raise ErnieError(f"{info.file}: tensor {name} ends early (the file was truncated while reading); re-download the file.")
                got += n
        return out.view(info.dtype).view(shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes a planned list of tensors, in that order, into shards of at most `shard_bytes` each."""

    def __init__(self, directory: Path, tensors: list[OutTensor], shard_bytes: int, metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        groups: list[list[OutTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + t.nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        self.shards = list(zip(shard_names(len(groups)), groups))
        self.order = [t for _, group in self.shards for t in group]
        self.total_bytes = sum(t.nbytes for t in tensors)
        self._next = 0
        self._shard = -1
        self._file = None
        self._left_in_shard = 0

    def _open_next_shard(self) -> None:
        self._close_file()
        self._shard += 1
        name, group = self.shards[self._shard]
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in group:
            header[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.dir / name, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._left_in_shard = len(group)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order):
            raise RuntimeError(f"tensor {name} was not planned")
        want = self.order[self._next]
        if (want.name, want.dtype, want.shape) != (name, tensor.dtype, tuple(tensor.shape)):
            raise RuntimeError(f"out of plan: got {name} {tensor.dtype} {tuple(tensor.shape)}, planned {want}")
        if self._left_in_shard == 0:
            self._open_next_shard()
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(_buffer(t))
        self._next += 1
        self._left_in_shard -= 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last shard and write the index (only when there are several shards)."""
        if self._next != len(self.order):
            missing = self.order[self._next].name
            raise RuntimeError(f"tensor {missing} and {len(self.order) - self._next - 1} more were never written")
        self._close_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: name for name, group in self.shards for t in group},
            }
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
