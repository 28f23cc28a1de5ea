"""bf16 products of many tokens on CPUs without bf16 arithmetic, computed in float32.

Why: on a CPU without AVX512_BF16 or AMX (an AVX2 machine), torch's bf16 matmul does not reach
oneDNN's fast paths: a 128-token [2560 -> 3072] product took 95 ms on the AMD EPYC VM of
docs/performance.md, against 17 ms for widening the weight to float32 in slices and calling the
float32 matmul (MKL's AVX2 kernels), and 12-token expert products 9.0 against 5.2 ms. The bf16
values widen exactly, the float32 sums are what torch's bf16 matmul accumulates in, and the result
is rounded once to bf16 as before.

The weight is widened a slice of rows at a time into one scratch buffer, so the extra memory is
one slice (ROWS x K floats), never a float32 copy of the model.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ernie_cli.kernels.cpu import native

ROWS = 512  # weight rows widened per slice: 5 MB of float32 at K = 2,560
_scratch = torch.empty(0)


@lru_cache(maxsize=None)
def cpu_lacks_bf16() -> bool:
    """Whether this CPU has no bf16 arithmetic at all (no AVX-512, no AMX): where the widening was
    measured to win. AVX-512 CPUs without BF16 keep torch's bf16 matmul (not measured here)."""
    flags, _ = native._cpu_flags()
    return bool(flags) and "avx512f" not in flags and "amx_bf16" not in flags


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x [..., K] @ w.T goes through here: bf16 both, on such a CPU, more than one token
    (one token has the native bf16 GEMV)."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and isinstance(w, torch.Tensor)
            and w.dtype == torch.bfloat16 and w.device.type == "cpu" and x.numel() > x.shape[-1]
            and not torch.compiler.is_compiling() and cpu_lacks_bf16())


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ w [N, K].T -> [M, N] bf16, summed in float32."""
    global _scratch
    n, k = w.shape
    xf = x.float()
    out = torch.empty((x.shape[0], n), dtype=torch.bfloat16)
    if _scratch.numel() < ROWS * k:
        _scratch = torch.empty(ROWS * k)
    for r0 in range(0, n, ROWS):
        rows = min(ROWS, n - r0)
        part = _scratch[: rows * k].view(rows, k)
        part.copy_(w[r0 : r0 + rows])
        out[:, r0 : r0 + rows] = F.linear(xf, part)
    return out
