"""One int4 product on the CPU at several token counts: the native integer kernel against expanding
the weight (Kernels.dequantize) to bf16 or float32 and torch's matmul in that dtype, and against
torch's own int4 kernel (QuantWeight's "cpu" backend); where the integer kernel and the expansion
cross is native.PREFILL_TOKENS (native.NEVER_EXPAND: the builds where they do not cross).

Usage: python benchmarks/cpu_prefill_kernels.py     (2 threads, median of 7 calls after one warm-up)
"""

import statistics
import time

import torch
import torch.nn.functional as F

from ernie_cli.kernels import quantized
from ernie_cli.kernels.cpu import native
from ernie_cli.quant import formats
from ernie_cli.quant.weight import QuantWeight

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


print(f"native build: {kern.feature_set}")
print("| matrix | tokens | integer kernel ms | expand bf16 ms | bf16 matmul ms | expand + matmul bf16 ms "
      "| expand + matmul float32 ms | torch int4 kernel ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for n, k in ((2560, 2560), (3072, 2560), (2560, 1536), (6144, 2560)):
    disk = formats.quantize("int4", torch.randn(n, k) * 0.02, 64)
    args = (disk["qweight"], disk["scales"], disk["zeros"])
    torch_int4 = QuantWeight("int4", (n, k), 64, "cpu").load(disk, torch.device("cpu"))
    expand = ms(lambda: kern.dequantize(4, *args, 64, 0, torch.bfloat16))
    w = kern.dequantize(4, *args, 64, 0, torch.bfloat16).clone()
    for m in (8, 16, 24, 32, 48, 64, 512):
        x = torch.randn(m, k).bfloat16()
        integer = ms(lambda: kern.int4(*args, x, 64))
        matmul = ms(lambda: F.linear(x, w))
        as_float = ms(lambda: F.linear(x.float(), kern.dequantize(4, *args, 64, 0, torch.float32)).bfloat16())
        theirs = ms(lambda: quantized.matmul(torch_int4, x))
        print(f"| {n}x{k} | {m} | {integer:.2f} | {expand:.2f} | {matmul:.2f} | {expand + matmul:.2f} | {as_float:.2f} "
              f"| {theirs:.2f} |", flush=True)
