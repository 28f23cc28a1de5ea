"""Checkpoint tensors into GPU memory: several reads at once, each through pinned staging buffers.

Why: one thread reading a tensor into pageable memory and copying it to the GPU moved 1-2.5 GB/s
from a warm page cache, so 12 GB of weights took longer than everything else a run does. Each
worker here owns a CUDA stream and two pinned buffers: it reads the next chunk (a positional read
from the page cache, which releases the GIL) while the previous chunk's copy to the GPU is still
in flight. Several workers keep several reads going, which is what the page cache and an NVMe
drive both need to reach their rate.

The memory held beyond the weights is the pinned buffers (workers x 2 x CHUNK) and, only where a
tensor changes dtype on the way (a bf16 checkpoint loaded in float32), that one tensor in its
file's dtype on the GPU. Every copy has finished when wait() returns; nothing may read the
destinations before that.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Callable

import torch

from ernie_cli.weights.checkpoint import TensorReader

CHUNK = 32 << 20
WORKERS = 8


class _Worker:
    """One thread's stream and buffers. Off CUDA (where the tests run the same code) the buffers
    are plain memory and every copy is done when it returns."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.turn = 0

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def next_buffer(self) -> torch.Tensor:
        """A buffer whose last copy to the GPU has finished, so it may be overwritten."""
        i = self.turn
        self.turn ^= 1
        if self.copied[i] is not None:
            self.copied[i].synchronize()
        return self.buffers[i]

    def copied_from(self, buffer: torch.Tensor) -> None:
        event = self.copied[0 if buffer.data_ptr() == self.buffers[0].data_ptr() else 1]
        if event is not None:
            event.record(self.stream)


class StagedCopier:
    """Queue tensor copies with copy(); wait() returns once every one has landed on the GPU."""

    def __init__(self, reader: TensorReader, device: torch.device, workers: int | None = None):
        self.reader, self.device = reader, device
        self.workers = workers or max(1, min(WORKERS, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ernie-load")
        self.local = threading.local()
        self.futures: list[Future] = []

    def copy(self, name: str, dest: torch.Tensor) -> None:
        """Checkpoint tensor `name` into `dest` (a GPU tensor of as many elements, in any dtype and
        layout), converted to dest's dtype on the way where the two differ."""
        if dest.numel() != self.reader.tensors[name].nbytes // self.reader.tensors[name].dtype.itemsize:
            raise ValueError(f"{name} has {self.reader.tensors[name].shape}, the destination {tuple(dest.shape)}")
        self.futures.append(self.pool.submit(self._copy, name, dest))

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new GPU tensor (allocated here, on the caller's stream) that will hold `name`, in dtype
        or the file's own."""
        info = self.reader.tensors[name]
        out = torch.empty(info.shape, dtype=dtype or info.dtype, device=self.device)
        self.copy(name, out)
        return out

    def wait(self, progress: Callable[[int], None] | None = None) -> None:
        """Block until every queued copy is on the GPU; progress(bytes) after each tensor."""
        try:
            for future in as_completed(self.futures):
                n = future.result()
                if progress:
                    progress(n)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self.futures.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "StagedCopier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _worker(self) -> _Worker:
        worker = getattr(self.local, "worker", None)
        if worker is None:
            worker = self.local.worker = _Worker(self.device)
        return worker

    def _copy(self, name: str, dest: torch.Tensor) -> int:
        info = self.reader.tensors[name]
        worker = self._worker()
        with worker.on_stream():
            direct = dest.is_contiguous() and dest.dtype == info.dtype
            # Made on the worker's stream and used only there, so it is freed safely in order.
            landing = dest if direct else torch.empty(info.shape, dtype=info.dtype, device=self.device)
            target = landing.reshape(-1).view(torch.uint8)
            for start in range(0, info.nbytes, CHUNK):
                n = min(CHUNK, info.nbytes - start)
                buffer = worker.next_buffer()
                self.reader.read_into(name, buffer[:n], start)
                target[start : start + n].copy_(buffer[:n], non_blocking=True)
                worker.copied_from(buffer)
            if not direct:
                dest.copy_(landing.reshape(dest.shape))
        return info.nbytes
