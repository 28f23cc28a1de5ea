"""Compile gpu_grouped's kernel for sm_90 without a GPU (Triton's compiler and ptxas), for every
tuner config and each form run_grouped_mm uses, and print whether it uses wgmma and how much shared
memory it takes (an sm_90 block has 227 KiB).

Usage (Triton 3.6.0, the device's version, beside torch's CPU build):
    PYTHONPATH=/tmp/tri36 python benchmarks/compile_grouped.py
"""
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from ernie_cli import gpu_grouped  # noqa: E402
fn = gpu_grouped._grouped
while not isinstance(fn, triton.runtime.jit.JITFunction):
    fn = fn.fn
params = list(inspect.signature(fn.fn).parameters)
types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "ends_ptr": "*i32", "order_ptr": "*i64", "slots": "i32", "out_ptr": "*bf16", "N": "i32", "K": "i32", "E": "i32", "w_expert_stride": "i32"}
for cfg in gpu_grouped._configs():
    for sw, order in ((1, 1), (0, 2), (0, 0)):
        consts = {**cfg.kwargs, "SWIGLU": sw, "ORDER": order, "BLOCK_E": 128}
        sig = {p: ("constexpr" if p in consts else types[p]) for p in params}
        hints = {(params.index(p),): [["tt.divisibility", 16]] for p in params if p not in consts and p not in ("ends_ptr", "order_ptr", "slots")}
        src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(p),): v for p, v in consts.items()}, attrs=hints)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = k.asm["ptx"]
        print(cfg.kwargs, cfg.num_warps, cfg.num_stages, "swiglu", sw, "order", order, "wgmma" in ptx, "mma" in ptx, "smem", k.metadata.shared)
