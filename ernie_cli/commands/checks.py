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
