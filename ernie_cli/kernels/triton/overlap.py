"""Programmatic dependent launch: on Hopper and later, a kernel of the decode step starts while the
one before it is finishing, and waits on the GPU (not the host) for that one's writes.

Why: a decode step is some 300 short kernels in a row (about 11 a layer), most of them a few
microseconds long, so each one's launch and start-up (its programs scheduled, their first loads
issued) is a real share of the step. With the launch attribute set, the next kernel's programs are
placed on the multiprocessors as soon as every program of the running kernel has said it may be
(`gdc_launch_dependents`), and each waits at `gdc_wait` until the running kernel has finished and
its writes are visible. A kernel launched this way must wait before it reads or writes anything
another kernel touches; `wait_for_inputs` at the top of each kernel does exactly that, so every
kernel that takes a PDL argument is safe in any order with any other. Waiting is transitive: a
kernel's wait returns only after the kernel before it has finished, which itself waited.

Inside torch.compile the launches are Inductor's to make, so the kernels there run without it.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

try:  # Triton comes with CUDA builds of torch; CPU-only installs never launch these kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

# Tests and benchmarks turn it off to compare the same kernels launched one after another.
ENABLED = True
# Triton's interpreter (tests on machines without a GPU): the kernels' modules read it here, once.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    # griddepcontrol is an sm_90 instruction; older Triton versions lack the language functions.
    return (
        triton is not None and not INTERPRETED
        and torch.cuda.get_device_capability(device_index)[0] >= 9
        and hasattr(tl.extra.cuda, "gdc_wait")
    )


def launch_args(x: torch.Tensor) -> dict:
    """Launch arguments for a kernel with a PDL parameter, on x's device: the kernel's own switch and
    the launch attribute together, so that one is never set without the other."""
    if ENABLED and x.is_cuda and not torch.compiler.is_compiling() and _supported(x.device.index or 0):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


if triton is not None:

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """First thing in a kernel: wait until the kernel before it has finished, then let the next
        one's programs be placed (they can only start waiting themselves)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
