"""Compile the decode step's changed Triton kernels for sm_90 without a GPU (Triton's compiler and
ptxas): gpu_attention's split kernel with and without RoPE and the cache write inside it
(ROPE_WRITE), printing whether it uses tensor-core mma, how many float32 FMAs it has (none with
fused multiply-add off), its stores and barriers and its shared memory.

Usage (Triton 3.6.0, the device's version, beside torch's CPU build):
    PYTHONPATH=/tmp/tri36 python benchmarks/compile_decode.py
"""
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ernie_cli.kernels.triton import attention as gpu_attention
fn = gpu_attention._partial
params = list(inspect.signature(fn.fn).parameters)
types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
         "scale": "fp32", "kv_stride": "i32", "k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
         "trig_stride": "i32"}
for rw in (False, True):
    consts = {"GROUP": 5, "D": 128, "SPLITS": 16, "QROWS": 16, "BLOCK_S": 64, "F32": False, "ROPE_WRITE": rw}
    sig = {p: ("constexpr" if p in consts else types[p]) for p in params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(p),): v for p, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2, "enable_fp_fusion": not rw})
    ptx = k.asm["ptx"]
    print("ROPE_WRITE", rw, "mma" in ptx, "fma.rn.f32 count", ptx.count("fma.rn.f32"), "st.global", ptx.count("st.global"), "bar.sync", ptx.count("bar.sync"), "smem", k.metadata.shared)

