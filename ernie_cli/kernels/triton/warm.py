"""Triton's once-per-process hashing, done while the weights load.

Why: in a warm one-shot `ernie complete` on the H200, the first Triton launch of the process spent
0.43 s hashing Triton's own installation (`triton_key`: its sources and libtriton, the first part of
every on-disk cache key) and 0.15 s hashing the kernels' sources, inside the prompt's forward
(docs/performance.md). Neither depends on the weights, and the large hashes release the GIL, so a
thread does both while the weights are read; both results are cached for the process by Triton
itself. Anything a Triton version names differently is skipped: the first launch then hashes as before.
"""

from __future__ import annotations

import threading

import torch

from ernie_cli.kernels.triton.gemv import triton


def _kernels():
    """Every JIT function of ernie's Triton kernels (an autotuner's or heuristics' wrapped one too)."""
    from triton.runtime.jit import JITFunction

    from ernie_cli.kernels.triton import attention, dequant, elementwise, gemv, grouped, paged, router

    for module in (attention, dequant, elementwise, gemv, grouped, paged, router):
        for value in vars(module).values():
            while value is not None and not isinstance(value, JITFunction):
                value = getattr(value, "fn", None)
            if value is not None:
                yield value


def _hash() -> None:
    try:
        from triton.runtime.cache import triton_key

        triton_key()
        for kernel in _kernels():
            kernel.cache_key  # a property: the source hash, kept on the function
    except Exception:  # noqa: BLE001 - a head start only; the first launch does whatever is left
        pass


def begin(device: torch.device) -> threading.Thread | None:
    """Start the hashing where Triton kernels will run on this device; None where they will not."""
    if device.type != "cuda" or triton is None:
        return None
    thread = threading.Thread(target=_hash, name="ernie-triton-hash", daemon=True)
    thread.start()
    return thread


def finish(thread: threading.Thread | None) -> None:
    """Wait for the hashing: two threads hashing at once would each do all of it."""
    if thread is not None:
        thread.join()
