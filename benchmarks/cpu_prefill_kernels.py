"""One int4 product on the CPU at several token counts: the native integer kernel against expanding
the weight to bf16 (Kernels.dequantize) and torch's bf16 matmul; where the two cross is
quant/native.PREFILL_TOKENS.

Usage: python benchmarks/cpu_prefill_kernels.py     (2 threads, median of 7 calls after one warm-up)
"""

import statistics
import time

import torch

from ernie_cli.kernels.cpu import native
from ernie_cli.quant import formats

torch.set_num_threads(2)
kern = native.kernels()


def ms(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


print("| matrix | tokens | integer kernel ms | expand ms | bf16 matmul ms | expand + matmul ms |")
print("|---|---:|---:|---:|---:|---:|")
for n, k in ((2560, 2560), (3072, 2560), (2560, 1536), (6144, 2560)):
    disk = formats.quantize("int4", torch.randn(n, k) * 0.02, 64)
    args = (disk["qweight"], disk["scales"], disk["zeros"])
    expand = ms(lambda: kern.dequantize(4, *args, 64, 0, torch.bfloat16))
    w = kern.dequantize(4, *args, 64, 0, torch.bfloat16).clone()
    for m in (8, 16, 24, 32, 48, 64, 512):
        x = torch.randn(m, k).bfloat16()
        integer = ms(lambda: kern.int4(*args, x, 64))
        matmul = ms(lambda: torch.nn.functional.linear(x, w))
        print(f"| {n}x{k} | {m} | {integer:.2f} | {expand:.2f} | {matmul:.2f} | {expand + matmul:.2f} |")
