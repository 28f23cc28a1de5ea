"""One-token GEMVs at the 21B-A3B shapes on CUDA: the Triton kernels of gpu_gemv, timed inside a CUDA
graph, as the decode step runs them.

Usage (GPU machine): python benchmarks/gpu_gemv_bench.py [FORMAT ...]   (default: float int8 int4)
A FORMAT ending in + (int8+) lets the tuner of the float/int8 kernel also try the WIDER block shapes;
int8 and int4 time the float kernel's byte loop (x in bf16); int8:dp4a and int4:dp4a time _gemv_dp4a
(x rounded to int8, what the product runs by default). The chosen shape of every row is printed.
Each row captures 100 calls in one CUDA graph and reports the median over 20 replays, per call. Calls
rotate over enough weight copies (or expert sets) that more than 300 MB is read between repeats, so
the 50 MB L2 cache does not serve them. GB/s = weight bytes one call reads / its time.
"""

from __future__ import annotations

import statistics
import sys

import torch
import triton

from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.quant import formats

CALLS, REPLAYS = 100, 20
KERNEL = gpu_gemv._gemv.fn
WIDER = [  # block shapes outside the shipped list: (BLOCK_N, BLOCK_K, warps)
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in ((2, 2048, 4), (4, 2048, 8), (32, 256, 8), (8, 512, 2), (4, 512, 2), (32, 512, 8))
]
MATRICES = (  # label, one weight's shape, experts taken per call (0: a plain matrix), one input per expert
    ("6 experts' gate_up [3072x2560]", (64, 3072, 2560), 6, False),
    ("6 experts' down [2560x1536]", (64, 2560, 1536), 6, True),
    ("q_proj [2560x2560]", (2560, 2560), 0, False),
    ("k_proj [512x2560]", (512, 2560), 0, False),
    ("shared gate_up [6144x2560]", (6144, 2560), 0, False),
    ("shared down [2560x3072]", (2560, 3072), 0, False),
    ("head [103424x2560]", (103424, 2560), 0, False),
)


def make(fmt, shape):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    if fmt == "float":
        return {"weight": w}, w.numel() * 2
    q = formats.quantize(fmt, w, 64)
    del w
    args = {"weight": q["qweight"], "scales": q["scales"], "zeros": q.get("zeros"), "group_size": 64}
    return args, sum(t.numel() * t.element_size() for t in q.values())


def graph_us(calls) -> float:
    """Median µs per call of a CUDA graph replaying calls (a list of zero-argument launches)."""
    for c in calls:  # autotune and compile outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    rows, picked = [], []
    for name in sys.argv[1:] or ("float", "int8", "int4"):
        fmt, wider = name.rstrip("+"), name.endswith("+")  # int8+: the tuner also tries WIDER
        fmt, _, form = fmt.partition(":")
        gpu_gemv.DP4A = form == "dp4a"
        gpu_gemv._gemv = triton.autotune(configs=gpu_gemv._configs() + (WIDER if wider else []), key=["N", "K", "P", "FMT"])(KERNEL)
        for label, shape, k, per in MATRICES:
            one, total = make(fmt, shape)
            if k:  # one stack; each call takes a different set of k experts
                sets = [torch.arange(i * k, i * k + k, device="cuda") % shape[0] for i in range(10)]
                read = total * k / shape[0]
                copies = [one] * len(sets)
            else:  # copies of the matrix, so repeats come from memory, not L2
                read = total
                copies = [one] + [make(fmt, shape)[0] for _ in range(min(CALLS - 1, 300_000_000 // total))]
                sets = [None] * len(copies)
            x = torch.randn((k, shape[-1]) if per else (shape[-1],), device="cuda", dtype=torch.bfloat16)
            calls = [
                (lambda a=copies[i % len(copies)], e=sets[i % len(sets)]: gpu_gemv.gemv(fmt, x, experts=e, per_expert_x=per, **a))
                for i in range(CALLS)
            ]
            rows.append((name, label, read / 1e6, graph_us(calls)))
            tuner = gpu_gemv._gemv_dp4a if gpu_gemv.DP4A else gpu_gemv._gemv
            picked.append(f"{name} {label}: {tuner.best_config}")
            copies = one = None
            torch.cuda.empty_cache()
    print("\n".join(picked))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {gpu_gemv.triton.__version__}; µs per call inside a CUDA graph")
    print("| weights | matrix | MB read | µs | GB/s |")
    print("|---|---|---:|---:|---:|")
    for fmt, label, mb, us in rows:
        print(f"| {fmt} | {label} | {mb:.1f} | {us:.1f} | {mb / us * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
