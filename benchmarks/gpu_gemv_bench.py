"""One-token GEMVs at the 21B-A3B shapes on CUDA: the Triton kernels of gpu_gemv against the
compiled multiply-and-sum form Inductor generated before them (the same bytes read), in one process.

Usage (GPU machine): python benchmarks/gpu_gemv_bench.py [FORMAT ...]   (default: float int8 int4)
Rows: 6 routed experts' gate_up [64, 3072, 2560] (shared input) and down [64, 2560, 1536] (one input
per expert), the q projection [2560, 2560] and the tied head [103424, 2560]; GB/s = weight bytes
read / median time of 50 calls (CUDA events), after a warm-up that also runs the autotuner.
"""

from __future__ import annotations

import torch

from ernie_cli import gpu_gemv
from ernie_cli.quant import formats


def median_us(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    times.sort()
    return times[len(times) // 2]


def weights(fmt, shape):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    if fmt == "float":
        return {"weight": w}, w.numel() * 2
    q = formats.quantize(fmt, w, 64)
    args = {"weight": q["qweight"], "scales": q["scales"], "zeros": q.get("zeros"), "group_size": 64}
    return args, sum(t.numel() * t.element_size() for t in q.values())


def inductor_form(fmt, args):
    """The previous decode path: dequantize by index and multiply-and-sum, compiled."""

    def deq(idx):
        w = args["weight"] if idx is None else args["weight"][idx]
        if fmt == "float":
            return w
        s = args["scales"] if idx is None else args["scales"][idx]
        if fmt == "int8":
            return formats.dequantize_int8(w, s, torch.bfloat16)
        z = args["zeros"] if idx is None else args["zeros"][idx]
        return formats.dequantize_int4(w, s, z, 64, torch.bfloat16)

    @torch.compile(fullgraph=True)
    def run(x, idx, per_expert):
        w = deq(idx)
        if idx is None:
            return (w * x[None, :]).sum(-1)
        return (w * (x[:, None, :] if per_expert else x[None, None, :])).sum(-1)

    return run


def main():
    torch._dynamo.config.cache_size_limit = 64  # one compiled baseline per (format, matrix)
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    experts = torch.tensor([3, 17, 22, 40, 41, 63], device="cuda")
    rows = []
    import sys

    for fmt in sys.argv[1:] or ("float", "int8", "int4"):
        for label, shape, idx, per in (
            ("experts gate_up x6", (64, 3072, 2560), experts, False),
            ("experts down x6", (64, 2560, 1536), experts, True),
            ("q_proj", (2560, 2560), None, False),
            ("head", (103424, 2560), None, False),
        ):
            args, total = weights(fmt, shape)
            read = total * (len(experts) / shape[0] if idx is not None else 1)
            k = shape[-1]
            x = torch.randn((len(experts), k) if per else (k,), device="cuda", dtype=torch.bfloat16)
            tri = median_us(lambda: gpu_gemv.gemv(fmt, x, experts=idx, per_expert_x=per, **args))
            ind_fn = inductor_form(fmt, args)
            ind = median_us(lambda: ind_fn(x, idx, per))
            # correctness against float64 on the selected weights
            y = gpu_gemv.gemv(fmt, x, experts=idx, per_expert_x=per, **args).double()
            ref = ind_fn(x, idx, per).double()
            rel = ((y - ref).norm() / ref.norm()).item()
            rows.append((fmt, label, read / 1e6, tri, read / tri / 1e3, ind, read / ind / 1e3, rel))
            args = None  # free the weights before the next matrix
            torch.cuda.empty_cache()
    print(f"\n{name}, torch {torch.__version__}")
    print("| weights | matrix | MB read | triton us | triton GB/s | inductor us | inductor GB/s | rel. diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:,.0f} | {r[5]:.1f} | {r[6]:,.0f} | {r[7]:.1e} |")


if __name__ == "__main__":
    main()
