"""The native CPU kernels of int_kernels.c (int4/int8 products, a bf16 GEMV, and one bf16 token's
RMSNorm, attention and router), compiled on first use.

The C file is built once per feature set of the CPU (FEATURE_SETS: the first whose flags the CPU
has) with the system's C compiler into the kernels folder of ernie's cache (ernie_cli.cachedir:
$XDG_CACHE_HOME/ernie or ~/.cache/ernie), under a name that carries the feature set and hashes the
sources (the C file and its per-instruction-set headers), the flags and the CPU model, written under
a temporary name and renamed. Python reaches it through ctypes: the kernels take raw pointers, so no
torch headers are needed and the build takes about a second.

AVX-512 VNNI CPUs get the AVX-512 build (isa_avx512.h); CPUs with AVX2 and FMA but not that, the
AVX2 build (isa_avx2.h): the same functions, by llama.cpp's AVX2 techniques. The AVX-512 build
without AVX512_BF16 has no bf16 GEMV (`Kernels.has_bf16` is False: oneDNN's matmul runs); the
AVX2 one has one (bf16 to float by a shift). Where the CPU has neither AVX-512 VNNI nor AVX2 with
FMA, no compiler is found, or the build fails, `kernels()` returns None: the quantized modules keep
torch's own int kernels, and bf16 products torch's matmul. AMX needs no kernel of its own here:
prefill expands the weights and calls oneDNN, which uses AMX where the CPU has it (the AVX-512
builds; the AVX2 one keeps its integer kernel for any number of tokens, NEVER_EXPAND). ERNIE_NATIVE=0
turns it all off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from ernie_cli.cachedir import cache_dir

SOURCE = Path(__file__).with_name("int_kernels.c")


def sources() -> list[Path]:
    """Every file the build reads: the C file and the headers beside it (the build's key hashes them all)."""
    return [SOURCE, *sorted(SOURCE.parent.glob("*.h"))]


FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-mtune=native"]
# (name, /proc/cpuinfo flags needed, compiler flags), best first.
FEATURE_SETS = (
    ("avx512-vnni-bf16", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"),
     ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"]),
    ("avx512-vnni", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"), ["-march=x86-64-v4", "-mavx512vnni"]),
    ("avx2", ("avx2", "fma"), ["-mavx2", "-mfma"]),
)
# From this many tokens a product expands the weight to floats and calls torch's matmul instead
# (Kernels.dequantize): the measured crossover on the 2-core Xeon with AMX (benchmarks/cpu_prefill_kernels.py).
PREFILL_TOKENS = 32
# Feature sets whose builds never expand (Kernels.prefill_tokens None): on the 2-core Zen 3 (AVX2, no
# bf16 hardware) torch's bf16 matmul of the expanded weight took 5-9x the integer kernel's time from 8
# to 512 tokens, and a float32 expansion with torch's float32 matmul was slower up to 64 tokens and
# from 3% faster to 36% slower at 512.
NEVER_EXPAND = ("avx2",)
BF16 = torch.bfloat16
BLOCK = 64  # activation block of the kernels: K must be a multiple of it
MAX_IN_FEATURES = 65536  # MAX_BLOCKS * BLOCK in the C file


def _cpu_flags() -> tuple[set[str], str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), ""
    flags, model = set(), ""
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    return flags, model


def _cache_dir() -> Path:
    return cache_dir("kernels")


def feature_set(flags: set[str]) -> tuple[str, list[str]] | None:
    """(name, compiler flags) of the best feature set these CPU flags allow, or None."""
    for name, needed, cflags in FEATURE_SETS:
        if all(f in flags for f in needed):
            return name, cflags
    return None


def build(compiler: str, target: Path, cflags: list[str]) -> None:
    """Compile int_kernels.c with `cflags` (and FLAGS) into `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *cflags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Kernels:
    """ctypes entry points of the compiled library."""

    def __init__(self, lib: ctypes.CDLL, feature_set: str = ""):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.prefill_tokens = None if feature_set in NEVER_EXPAND else PREFILL_TOKENS
        self.q4 = lib.ernie_q4_matmul
        self.q4.argtypes = [p, p, p, p, i64, p, i32, i64, p, i32, i64, i64, i64, i64]
        self.q4.restype = ctypes.c_int
        self.q8 = lib.ernie_q8_matmul
        self.q8.argtypes = [p, p, p, i64, p, i32, i64, p, i32, i64, i64, i64]
        self.q8.restype = ctypes.c_int
        self.deq = lib.ernie_dequantize
        self.deq.argtypes = [i32, p, p, p, i64, i64, i64, i64, p, i32]
        self.deq.restype = None
        self.has_bf16 = bool(lib.ernie_has_bf16())  # whether this build has a bf16 GEMV
        self.bf16 = lib.ernie_bf16_gemv
        self.bf16.argtypes = [p, p, i64, p, i64, p, i32, i64, i64]
        self.bf16.restype = ctypes.c_int
        f32 = ctypes.c_float
        self.norm = lib.ernie_rms_norm_bf16
        self.norm.argtypes = [p, p, p, i64, i64, f32]
        self.norm.restype = None
        self.attend = lib.ernie_decode_attention_bf16
        self.attend.argtypes = [p, p, p, p, p, i64, p, p, i64, i64, i64, i64, f32, p]
        self.attend.restype = ctypes.c_int
        self.router = lib.ernie_route_bf16
        self.router.argtypes = [p, p, p, i64, i64, i64, f32, i64, p, p]
        self.router.restype = None
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self._set_threads = lib.ernie_set_threads
        self._set_threads.argtypes = [i32]
        self._threads = None

    def int4(self, qweight, scales, zeros, x, group_size, experts=None, per_expert_x=False, out_dtype=None):
        """x [M, K] (or [P, M, K] with per_expert_x), float32 or bfloat16 -> [P, M, N] (P = 1 without
        experts) in out_dtype (default: x's).

        qweight uint8 [(E,) N, K/2], scales/zeros bf16 [(E,) N, K/group]: the disk layout."""
        n, k = qweight.shape[-2], qweight.shape[-1] * 2
        out, ex, p_count, m, stride = self._prepare(x, n, k, experts, per_expert_x, out_dtype)
        rc = self.q4(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), ex, p_count, x.data_ptr(), x.dtype == BF16,
                     stride, out.data_ptr(), out.dtype == BF16, m, n, k, group_size)
        return self._check(rc, out)

    def int8(self, qweight, scales, x, experts=None, per_expert_x=False, out_dtype=None):
        """Like int4, for int8 [(E,) N, K] weights with bf16 scales [(E,) N]."""
        n, k = qweight.shape[-2], qweight.shape[-1]
        out, ex, p_count, m, stride = self._prepare(x, n, k, experts, per_expert_x, out_dtype)
        rc = self.q8(qweight.data_ptr(), scales.data_ptr(), ex, p_count, x.data_ptr(), x.dtype == BF16, stride,
                     out.data_ptr(), out.dtype == BF16, m, n, k)
        return self._check(rc, out)

    def bf16_gemv(self, weight, x, experts=None, per_expert_x=False, out_dtype=None):
        """One token against bf16 weights: x bf16 [K] (or [P, K] with per_expert_x) -> [P, N] (P = 1
        without experts) in out_dtype (default bf16: one rounding of the float32 sum).

        weight bf16 [(E,) N, K], contiguous. Needs has_bf16 (this build has a bf16 GEMV)."""
        self._follow_threads()
        n, k = weight.shape[-2], weight.shape[-1]
        assert weight.dtype == BF16 and weight.is_contiguous() and x.dtype == BF16 and x.is_contiguous() and x.shape[-1] == k
        assert experts is None or (experts.dtype == torch.int64 and experts.is_contiguous())
        p_count = 1 if experts is None else experts.numel()
        out_dtype = out_dtype or BF16
        out = torch.empty((p_count, n), dtype=out_dtype)
        rc = self.bf16(weight.data_ptr(), None if experts is None else experts.data_ptr(), p_count, x.data_ptr(),
                       k if per_expert_x else 0, out.data_ptr(), out_dtype == BF16, n, k)
        if rc != 0:
            raise RuntimeError("this build of the native kernels has no bf16 GEMV (AVX-512 without AVX512_BF16)")
        return out

    # One token's small operations (bf16): each one call where torch took several (ops.py decides).

    def rms_norm(self, x, weight, eps: float):
        """x bf16 [..., n] (contiguous), weight bf16 [n] -> bf16, in transformers' order of roundings."""
        self._follow_threads()
        out = torch.empty_like(x)
        n = x.shape[-1]
        self.norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
        return out

    def decode_attention(self, q, k, v, cache_k, cache_v, cos, sin, pos: int, scale: float):
        """One token of one sequence: q [H, d], k/v [KV, d] bf16 (not rotated); cache_k/cache_v bf16
        [KV, capacity, d], written at pos; cos/sin float32 [d], the row of pos -> out bf16 [H, d]."""
        self._follow_threads()
        heads, d = q.shape
        out = torch.empty_like(q)
        rc = self.attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), cache_k.shape[1],
                         cos.data_ptr(), sin.data_ptr(), pos, heads, k.shape[0], d, scale, out.data_ptr())
        if rc != 0:
            raise MemoryError("the native attention could not allocate its score buffer")
        return out

    def route(self, x, weight, bias, top_k: int, norm_min: float, always: int):
        """One token, x bf16 [H]; weight float32 [E, H], bias float32 [E] -> (weights bf16 [1, k],
        ids int64 [1, k]) with k = top_k + always, as ops.route defines them."""
        e, h = weight.shape
        weights = torch.empty((1, top_k + always), dtype=BF16)
        idx = torch.empty((1, top_k + always), dtype=torch.int64)
        self.router(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), e, h, top_k, norm_min, always, weights.data_ptr(), idx.data_ptr())
        return weights, idx

    def expands(self, tokens: int) -> bool:
        """Whether a product of this many tokens expands the weight (dequantize, then torch's matmul)
        rather than running the integer kernel."""
        return self.prefill_tokens is not None and tokens >= self.prefill_tokens

    def dequantize(self, bits, qweight, scales, zeros, group_size, expert, dtype):
        """Expert `expert` (an int; 0 for a plain matrix) of the disk layout -> float32/bf16 [N, K].

        The result lives in a scratch buffer that the next call overwrites: use it at once. (A fresh
        buffer per call would page-fault in up to 126 MB each time.)"""
        self._follow_threads()
        n = qweight.shape[-2]
        k = qweight.shape[-1] * (2 if bits == 4 else 1)
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < n * k:
            buf = self._scratch[dtype] = torch.empty(n * k, dtype=dtype)
        out = buf[: n * k].view(n, k)
        self.deq(bits, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr() if zeros is not None else None, expert,
                 n, k, group_size, out.data_ptr(), dtype == BF16)
        return out

    def _follow_threads(self):
        threads = torch.get_num_threads()  # `-t` and torch.set_num_threads govern these kernels too
        if threads != self._threads:
            self._set_threads(threads)
            self._threads = threads

    def _prepare(self, x, n, k, experts, per_expert_x, out_dtype):
        self._follow_threads()
        assert x.dtype in (torch.float32, BF16) and x.is_contiguous() and x.shape[-1] == k
        assert experts is None or (experts.dtype == torch.int64 and experts.is_contiguous())
        p_count = 1 if experts is None else experts.numel()
        m = x.shape[-2]
        stride = m * k if per_expert_x else 0
        ex = None if experts is None else experts.data_ptr()
        out_dtype = out_dtype or x.dtype
        assert out_dtype in (torch.float32, BF16)
        return torch.empty((p_count, m, n), dtype=out_dtype), ex, p_count, m, stride

    @staticmethod
    def _check(rc: int, out: torch.Tensor) -> torch.Tensor:
        if rc != 0:
            raise MemoryError("the native int kernel could not allocate its activation buffers")
        return out


@lru_cache(maxsize=1)
def kernels() -> Kernels | None:
    """The compiled kernels, or None where they cannot run here (see the module docstring)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags, model = _cpu_flags()
    chosen = feature_set(flags)
    if chosen is None:
        return None
    name, cflags = chosen
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    text = b"".join(path.name.encode() + b"\0" + path.read_bytes() for path in sources())
    key = hashlib.sha256(text + " ".join(FLAGS + cflags + [compiler, model]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ernie_cpu_kernels_{name}_{key}.so"
    try:
        if not target.exists():
            build(compiler, target, cflags)
        return Kernels(ctypes.CDLL(str(target)), name)
    except (OSError, subprocess.SubprocessError):
        return None


# ---- as a torch operator, for torch.compile ---------------------------------------------------------
# A ctypes call is opaque to Dynamo; registered as an operator with a shape-only ("fake") version, it
# stays one call in a compiled decode step while Inductor fuses the small ops around it.


@torch.library.custom_op("ernie::int_matmul", mutates_args=())
def int_matmul(bits: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], x: torch.Tensor,
               group_size: int, experts: Optional[torch.Tensor], per_expert_x: bool, out_bf16: bool) -> torch.Tensor:
    """Kernels.int4 (bits 4) or Kernels.int8 (bits 8), output bf16 or float32."""
    out_dtype = BF16 if out_bf16 else torch.float32
    x, experts = x.contiguous(), None if experts is None else experts.contiguous()  # compiled callers may pass views
    if bits == 4:
        return kernels().int4(qweight, scales, zeros, x, group_size, experts, per_expert_x, out_dtype)
    return kernels().int8(qweight, scales, x, experts, per_expert_x, out_dtype)


@int_matmul.register_fake
def _(bits, qweight, scales, zeros, x, group_size, experts, per_expert_x, out_bf16):
    p_count = 1 if experts is None else experts.numel()
    return x.new_empty((p_count, x.shape[-2], qweight.shape[-2]), dtype=BF16 if out_bf16 else torch.float32)
