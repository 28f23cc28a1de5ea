"""Checks of the options every model-loading command shares, made before anything is read or loaded."""

from __future__ import annotations

import re

from ernie_cli.errors import UsageError

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def check_model_options(dtype: str, quantize: str | None, device: str | None = None, max_context: int | None = None) -> None:
    if max_context is not None and max_context < 2:
        raise UsageError("--max-context must be at least 2.")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of auto, bfloat16, float16, float32.")
    if quantize not in (None, "int8", "int4"):
        raise UsageError(f"--quantize {quantize!r} is not one of int8, int4.")
    if device is not None and not DEVICE.fullmatch(device):
        raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N.")


def check_compile(compile: str) -> None:
    if compile not in ("auto", "graph", "on", "off"):
        raise UsageError(f"--compile {compile!r} is not one of auto, graph, on, off.")


def check_tp(tp: int, quantize: str | None, compile: str, device: str | None = None) -> None:
    """--tp N: the model split over N processes, from a float checkpoint, with eager steps, on
    GPUs 0 to N-1 (docs/multi-gpu.md)."""
    if tp < 1:
        raise UsageError("--tp must be at least 1.")
    if tp == 1:
        return
    if quantize:
        raise UsageError("--tp loads a float checkpoint and cannot quantize while loading: drop --quantize or --tp.")
    if compile in ("on", "graph"):
        raise UsageError("--tp runs its steps eagerly: leave --compile at auto or set it off.")
    if device is not None and device.startswith("cuda:"):
        raise UsageError(f"--device {device} picks one GPU, but --tp {tp} takes GPUs 0 to {tp - 1}: use --device cuda.")
