"""The native int4 kernel on one token against six routed experts' gate_up ([64, 3072, 2560] stack,
a different 6 experts each call, so the weights come from DRAM), at 1 and 2 threads, alternating.
Compare the GB/s with the raw read rate of benchmarks/cpu_bandwidth.c.

Usage: python benchmarks/cpu_decode_kernels.py     (median of 50 calls after 10 warm-up calls)
"""

import statistics
import time

import torch

from ernie_cli.kernels.cpu import native
from ernie_cli.quant import formats

kern = native.kernels()
disk = formats.quantize("int4", torch.randn(64, 3072, 2560) * 0.02, 64)
read = sum(t.numel() * t.element_size() for t in disk.values()) * 6 / 64
x = torch.randn(1, 2560).bfloat16()
for threads in (1, 2, 1, 2):
    torch.set_num_threads(threads)
    times = []
    for i in range(60):
        experts = torch.arange(6) + 6 * (i % 10)
        t = time.perf_counter()
        kern.int4(disk["qweight"], disk["scales"], disk["zeros"], x, 64, experts)
        times.append(time.perf_counter() - t)
    us = statistics.median(times[10:]) * 1e6
    print(f"{threads} thread(s): {us:.0f} µs, {read / us / 1e3:.1f} GB/s")
