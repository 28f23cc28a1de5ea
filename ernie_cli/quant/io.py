"""Plain reads and streamed writes of safetensors files, with bounded memory.

Reading is checkpoint.TensorReader (plain positional reads, see there).

Writing: `ShardWriter` is told every output tensor's name, dtype and shape up front (the quantized
layout is known before any weight is read), so it splits them into shards and writes each shard's
header first; each tensor's bytes then go to disk the moment they are produced. Nothing waits in
memory for a shard to fill.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ernie_cli.weights.checkpoint import byte_view, tensor_nbytes
from ernie_cli.weights.files import INDEX_FILE

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


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


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
            self._file.write(byte_view(t))
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
