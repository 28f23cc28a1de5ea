"""Tuning choices shipped for known GPUs, so that a first run there never autotunes.

Triton's autotuner times every configuration of a kernel for each new shape it meets, compiling
each one first: in a first `ernie complete` after installing, that was most of the time before
the first token (docs/performance.md). Its choices for the shapes of the ERNIE 4.5 models on the
cards in choices.json (beside this file) were recorded by `python benchmarks/triton_choices.py`
and are put into the tuners' own tables before their first launch; a shape or card not listed is
tuned as before, once, and kept in Triton's cache (`cache_results`). The keys are the tuner's own (its key arguments, then
the dtypes of the tensor arguments), so a Triton that forms them differently simply finds none.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


def _shipped() -> dict:
    try:
        return json.loads((Path(__file__).with_name("choices.json")).read_text())
    except (OSError, ValueError):  # a damaged or missing table only means tuning as before
        return {}


# {device name: {kernel name: [[key, [kwargs, num_warps, num_stages]], ...]}}
CHOICES: dict[str, dict[str, list]] = _shipped()


@lru_cache(maxsize=None)
def seed(kernel_name: str, device_index: int) -> None:
    """Put the shipped choices for this kernel and this process's card into its tuner, once."""
    import torch

    from ernie_cli.kernels.triton import gemv, grouped

    table = CHOICES.get(torch.cuda.get_device_name(device_index), {}).get(kernel_name)
    if not table:
        return
    tuner = {"_gemv": gemv._gemv, "_gemv_dp4a": gemv._gemv_dp4a, "_grouped": grouped._grouped}[kernel_name]
    configs = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages): c for c in tuner.configs}
    for key, (kwargs, warps, stages) in table:
        config = configs.get((tuple(sorted(kwargs.items())), warps, stages))
        if config is not None:  # only a configuration the tuner itself offers
            tuner.cache.setdefault(tuple(key), config)
