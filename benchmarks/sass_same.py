"""Whether two revisions of ernie_cli/kernels/triton/gemv.py compile to the same sm_90 machine code, kernel by
kernel: the check that a refactor of the kernels changed nothing that a GPU would run, made without
a GPU (see benchmarks/sass_count.py for the set-up).

Usage: PYTHONPATH=/tmp/tri36 python benchmarks/sass_same.py OLD.py [NEW.py]
(NEW defaults to this checkout's file; git show REV:ernie_cli/kernels/triton/gemv.py > OLD.py gives an old one.)
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import triton

sys.path.insert(0, os.path.dirname(__file__))
import sass_count  # noqa: E402

CASES = [  # kernel, BLOCK_N, BLOCK_K in weights, warps, constants beyond sass_count.CONSTS
    ("_gemv", 8, 512, 4, {"FMT": 2, "HAS_IDX": 1}),
    ("_gemv", 16, 256, 4, {"FMT": 1, "HAS_IDX": 0}),
    ("_gemv", 16, 256, 4, {"FMT": 0, "HAS_IDX": 1}),
    ("_gemv_int4", 16, 512, 4, {"HAS_IDX": 1}),
    ("_gemv_dp4a", 16, 512, 4, {"FMT": 2, "KW": 320, "GROUP_WORDS": 8, "HAS_IDX": 1}),
    ("_gemv_dp4a", 32, 512, 4, {"FMT": 1, "KW": 640, "GROUP_WORDS": 16, "HAS_IDX": 0}),
]


def machine_code(path: str, name: str, block_n: int, block_k: int, warps: int, consts: dict) -> list[str] | None:
    spec = importlib.util.spec_from_file_location(f"gemv_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        return None
    sass_count.CONSTS.update(consts)
    sass_count.count(sass_count.jit_function(getattr(module, name)), block_n, block_k, warps)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "-sass", "/tmp/ernie_sass_count.cubin"], capture_output=True, text=True, check=True).stdout
    return [line.split("*/", 1)[1].strip() for line in out.splitlines() if re.search(r"/\*[0-9a-f]{4,5}\*/", line)]


def main() -> None:
    old = sys.argv[1]
    new = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "ernie_cli", "gpu_gemv.py")
    base = dict(sass_count.CONSTS)
    for name, bn, bk, warps, consts in CASES:
        a = machine_code(old, name, bn, bk, warps, {**base, **consts})
        b = machine_code(new, name, bn, bk, warps, {**base, **consts})
        verdict = "missing in one" if a is None or b is None else "same" if a == b else "DIFFERENT"
        print(f"{name} {bn} x {bk} {consts}: {verdict} ({len(a or [])} / {len(b or [])} instructions)")


if __name__ == "__main__":
    main()
