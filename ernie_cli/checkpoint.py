"""Reading safetensors checkpoints: the file set, the headers, and one tensor at a time.

Headers are parsed here rather than trusted to safetensors so that a truncated or corrupt file, a
shard missing from disk, or a tensor the index promises but the shard lacks each fail before any
weight is read, with a message that names the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ernie_cli.errors import ErnieError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

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
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


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


class Checkpoint:
    """Every tensor of a model directory, read lazily through memory-mapped safe_open handles."""

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
        self._handles: dict[Path, object] = {}

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

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ErnieError(f"{info.file}: cannot read tensor {name} ({exc}); re-download the file.") from None

    def close(self) -> None:
        self._handles.clear()
