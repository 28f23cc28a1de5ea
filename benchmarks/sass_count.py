"""SASS instructions per weight in the inner loop of the int4 one-token kernels, compiled for sm_90
without a GPU: Triton's own compiler and ptxas, then cuobjdump. The loop is the one a backward
branch closes; weights per thread per step = BLOCK_N x BLOCK_K / threads.

Usage (any machine; Triton 3.6.0, the device's version, installed beside torch's CPU build, e.g.
`pip install --no-deps --target /tmp/tri36 triton==3.6.0`):
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_count.py [path/to/gpu_gemv.py]
The file defaults to this checkout's ernie_cli/kernels/triton/gemv.py; pass an older revision's copy
(git show REV:ernie_cli/kernels/triton/gemv.py > /tmp/old.py) to count its kernels. Shapes: K = 2560 (the
hidden size), group 64, bf16 activations, experts picked by index; divisibility hints as the Triton
runtime gives them for these shapes.
"""

from __future__ import annotations

import collections
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

K = 2560
TYPES = {  # by parameter name, for every revision's kernels
    "x_ptr": "*bf16", "xp_ptr": "*fp32", "xs_ptr": "*fp32", "idx_ptr": "*i64", "s_ptr": "*bf16", "z_ptr": "*bf16",
    "out_ptr": "*bf16", "x_slot_stride": "i32", "N": "i32", "K": "i32", "P": "i32", "w_expert_stride": "i64",
    "s_expert_stride": "i64", "w_row_stride": "i32", "s_row_stride": "i32",
}
NOT_DIVISIBLE = {"s_row_stride", "P"}  # 40 groups a row, 6 experts: no 16-divisibility hint
CONSTS = {"GROUP": 64, "GROUP_WORDS": 8, "HAS_IDX": 1, "FMT": 2, "K8": K // 8, "X_PER_SLOT": 0, "MAGIC": 0, "EVEN_N": 1,
          "KW": K // 8, "EMULATE": 0, "SWIGLU": 0}
SHAPES = {  # kernel: (BLOCK_N, BLOCK_K in weights, warps)
    "_gemv": [(8, 512, 4), (4, 1024, 4), (32, 256, 4)],
    "_gemv_int4": [(8, 512, 4), (16, 512, 4), (32, 512, 4), (64, 512, 4)],
    "_gemv_dp4a": [(8, 512, 4), (16, 512, 4), (32, 512, 4), (64, 512, 4)],
}


def jit_function(obj):
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def loop_instructions(sass: str) -> tuple[int, collections.Counter]:
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?)\s*;", sass)]
    best = (0, collections.Counter())
    for addr, text in ins:
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            best = max(best, (len(body), collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)), key=lambda b: b[0])
    return best


def count(fn, block_n: int, block_k: int, warps: int) -> tuple[float, collections.Counter]:
    params = list(inspect.signature(fn.fn).parameters)
    blocks = {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_W": block_k // 8}
    consts = {p: {**CONSTS, **blocks}[p] for p in params if p not in TYPES and p != "w_ptr"}
    sig = {p: ("constexpr" if p in consts else TYPES.get(p, "*i32" if "BLOCK_W" in params else "*u8")) for p in params}
    hints = {(params.index(p),): [["tt.divisibility", 16]] for p in params if p not in consts and p not in NOT_DIVISIBLE}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(p),): v for p, v in consts.items()}, attrs=hints)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    cubin = "/tmp/ernie_sass_count.cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    n, ops = loop_instructions(subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout)
    return n / (block_n * block_k / (32 * warps)), ops


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "ernie_cli", "gpu_gemv.py")
    spec = importlib.util.spec_from_file_location("gemv_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"triton {triton.__version__}, sm_90, K = {K}, group 64; {path}")
    print("| kernel | BLOCK_N x BLOCK_K, warps | instructions per weight | most frequent |")
    print("|---|---|---:|---|")
    for name, shapes in SHAPES.items():
        if not hasattr(module, name):
            continue
        fn = jit_function(getattr(module, name))
        for bn, bk, w in shapes:
            per_weight, ops = count(fn, bn, bk, w)
            top = ", ".join(f"{op} {c}" for op, c in ops.most_common(4))
            print(f"| {name} | {bn} x {bk}, {w} | {per_weight:.1f} | {top} |")


if __name__ == "__main__":
    main()
