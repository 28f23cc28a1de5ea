"""One-token products on the CPU, per kernel and per shape of ERNIE-4.5-21B-A3B, in GB/s of weights
read, against the DRAM read rate of benchmarks/cpu_bandwidth.c probed in the same process and round.

Each shape is a stack of copies (or the 64 experts) larger than the last-level cache, and each call
takes other copies, so that the weights come from DRAM as in decoding. Variants are builds of
int_kernels.c (for this CPU's feature set) with other -D settings, of another revision (--baseline;
skipped where that revision has no build for this CPU), or torch, one matrix at a time as decoding
without the native kernels runs them (int4/int8: its weight-only int kernels on the layouts
QuantWeight's "cpu" backend makes; bf16: F.linear, oneDNN); they take turns call by call, round after
round, so that the machine's drift hits all alike.

Usage:
  python benchmarks/cpu_decode_kernels.py                                  # int4, int8, bf16; 3 rounds
  python benchmarks/cpu_decode_kernels.py --formats int4 --baseline main   # against main's kernels
  python benchmarks/cpu_decode_kernels.py --variants "tile1=-DTILE=1;ahead0=-DAHEAD=0"
Prints a markdown table (median µs and GB/s per variant over the rounds' medians) and each round's
probe and load average on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ernie_cli.kernels import quantized
from ernie_cli.kernels.cpu import native
from ernie_cli.quant.weight import QuantWeight

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
H, I_MOE, I_SHARED, VOCAB, QKV = 2560, 1536, 3072, 103424, 2560 + 2 * 512
# (name, out, in, experts taken per call (0: a single matrix), inputs per expert)
SHAPES = [
    ("qkv", QKV, H, 0, False),
    ("o", H, H, 0, False),
    ("shared gate_up", 2 * I_SHARED, H, 0, False),
    ("shared down", H, I_SHARED, 0, False),
    ("experts gate_up (6 of 64)", 2 * I_MOE, H, 6, False),
    ("experts down (6 of 64)", H, I_MOE, 6, True),
    ("head", VOCAB, H, 0, False),
]
STACK_BYTES = 256 << 20  # each shape's copies together: well past the 32 MB L3


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def compile_lib(source: Path, out: Path, defines: list[str], quiet: bool = False) -> ctypes.CDLL:
    _, cflags = native.feature_set(native._cpu_flags()[0])
    subprocess.run(["cc", *native.FLAGS, *cflags, *defines, str(source), "-o", str(out), "-lm"], check=True,
                   stderr=subprocess.DEVNULL if quiet else None)
    return ctypes.CDLL(str(out))


class Lib:
    """A build of int_kernels.c: int4/int8/bf16 one-token calls on raw pointers."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.ernie_q4_matmul.argtypes = [p, p, p, p, i64, p, i32, i64, p, i32, i64, i64, i64, i64]
        lib.ernie_q8_matmul.argtypes = [p, p, p, i64, p, i32, i64, p, i32, i64, i64, i64]
        lib.ernie_set_threads.argtypes = [i32]
        lib.ernie_set_threads(threads)
        self.lib = lib
        self.bf16 = getattr(lib, "ernie_bf16_gemv", None)
        if self.bf16 is not None:
            self.bf16.argtypes = [p, p, i64, p, i64, p, i32, i64, i64]

    def run(self, fmt, w, x, experts, per_expert_x, out):
        e = experts.data_ptr()
        stride = x.shape[-1] if per_expert_x else 0
        n, k, p_count = out.shape[-1], x.shape[-1], experts.numel()
        if fmt == "int4":
            q, s, z = w
            return self.lib.ernie_q4_matmul(q.data_ptr(), s.data_ptr(), z.data_ptr(), e, p_count, x.data_ptr(), 1, stride,
                                            out.data_ptr(), 1, 1, n, k, 64)
        if fmt == "int8":
            q, s = w
            return self.lib.ernie_q8_matmul(q.data_ptr(), s.data_ptr(), e, p_count, x.data_ptr(), 1, stride, out.data_ptr(), 1,
                                            1, n, k)
        return self.bf16(w[0].data_ptr(), e, p_count, x.data_ptr(), stride, out.data_ptr(), 1, n, k)


def make_weights(fmt: str, copies: int, n: int, k: int):
    """Random codes of the disk layout (speed does not depend on the values)."""
    if fmt == "int4":
        q = torch.randint(0, 256, (copies, n, k // 2), dtype=torch.uint8)
        s = (torch.rand(copies, n, k // 64) * 1e-3).to(BF16)
        return q, s, (torch.randn(copies, n, k // 64) * 1e-3).to(BF16)
    if fmt == "int8":
        return torch.randint(-127, 128, (copies, n, k), dtype=torch.int8), (torch.rand(copies, n) * 1e-3).to(BF16)
    return ((torch.randn(copies, n, k) * 0.02).to(BF16),)


def bytes_per_matrix(w) -> int:
    return sum(t[0].numel() * t.element_size() for t in w)


def time_interleaved(runners: dict, count: int, warm: int = 5) -> dict[str, float]:
    """Median seconds of `count` calls of each runner, the runners taking turns call by call (so that
    a busy moment of a shared machine hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(count + warm):
        for v, (name, call) in enumerate(runners.items()):
            t = time.perf_counter()
            call(i * len(runners) + v)  # every call takes weights that no recent call read
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts[warm:]) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4,int8,bf16")
    ap.add_argument("--shapes", default="", help="comma list of shape names to keep (default: all)")
    ap.add_argument("--variants", default="", help='"name=-DX=1 -DY=2;name2=..." builds of this checkout besides its default')
    ap.add_argument("--baseline", default="", help="a git revision whose int_kernels.c runs as a variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ernie-kbench-"))
    probe_src = ROOT / "benchmarks" / "cpu_bandwidth.c"
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-DPROBE_LIBRARY", str(probe_src), "-o",
                    str(tmp / "probe.so")], check=True)
    probe = ctypes.CDLL(str(tmp / "probe.so"))
    probe.read_rate_median.restype = ctypes.c_double
    probe.read_rate_median.argtypes = [ctypes.c_int]

    libs: dict[str, Lib] = {"new": Lib(compile_lib(native.SOURCE, tmp / "new.so", []), args.threads)}
    for spec in filter(None, args.variants.split(";")):
        name, defines = spec.split("=", 1)
        libs[name] = Lib(compile_lib(native.SOURCE, tmp / f"{name}.so", defines.split()), args.threads)
    if args.baseline:
        # the revision's whole kernel folder: the C file includes its headers by relative path
        folder = "ernie_cli/kernels/cpu"
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, folder], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        try:
            libs[args.baseline] = Lib(compile_lib(tmp / folder / "int_kernels.c", tmp / "baseline.so", [], quiet=True), args.threads)
        except subprocess.CalledProcessError:
            print(f"{args.baseline}'s kernels do not build for this CPU's feature set: left out", file=sys.stderr)

    results: dict[tuple[str, str, str], list[float]] = {}
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    for fmt in args.formats.split(","):
        for name, n, k, take, per_expert_x in shapes:
            if fmt == "int4" and name == "head":
                continue  # the int4 models keep the tied embedding in int8
            one = bytes_per_matrix(make_weights(fmt, 1, n, k))
            copies = 64 if take else max(2, min(64, STACK_BYTES // one))
            w = make_weights(fmt, copies, n, k)
            p_count = max(take, 1)
            x = torch.randn(p_count if per_expert_x else 1, k).to(BF16)
            out = torch.empty(p_count, n, dtype=BF16)
            read = one * p_count

            def experts_of(i):
                return torch.arange(p_count) * (copies // p_count) + i % (copies // p_count) if take else torch.tensor([i % copies])

            runners = {}
            for vname, lib in libs.items():
                if fmt == "bf16" and lib.bf16 is None:
                    continue
                runners[vname] = (lambda i, lib=lib, w=w: lib.run(fmt, w, x, experts_of(i), per_expert_x, out))
            xs = x if per_expert_x else x.expand(p_count, k)
            if fmt == "bf16":
                runners["torch"] = lambda i, w=w: [F.linear(xs[j:j + 1], w[0][e]) for j, e in enumerate(experts_of(i).tolist())]
            else:
                keys = ("qweight", "scales", "zeros")
                wq = QuantWeight(fmt, (copies, n, k), 64, "cpu").load(dict(zip(keys, w)), torch.device("cpu"))
                runners["torch"] = lambda i, wq=wq: [quantized.matmul(wq, xs[j:j + 1], e) for j, e in enumerate(experts_of(i).tolist())]
            for r in range(args.rounds):
                rate = probe.read_rate_median(args.threads)
                print(f"round {r} {fmt} {name}: probe {rate:.1f} GB/s on {args.threads} threads, load {load_avg()}", file=sys.stderr)
                results.setdefault((fmt, name, "probe"), []).append(1e6 * read / (rate * 1e9))
                for vname, seconds in time_interleaved(runners, args.calls).items():
                    results.setdefault((fmt, name, vname), []).append(seconds * 1e6)
            results[(fmt, name, "_bytes")] = [read]
            del w, runners  # the default arguments held the last references
    probe.release()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    print(f"CPU: {model}; {args.threads} threads; torch {torch.__version__}; medians of {args.rounds} rounds of {args.calls} calls")
    print("| format | shape | MB read | variant | µs | GB/s | of the probe |")
    print("|---|---|---:|---|---:|---:|---:|")
    for (fmt, name, vname), values in results.items():
        if vname.startswith("_") or vname == "probe":
            continue
        read = results[(fmt, name, "_bytes")][0]
        us = statistics.median(values)
        probe_us = statistics.median(results[(fmt, name, "probe")])
        print(f"| {fmt} | {name} | {read / 1e6:.1f} | {vname} | {us:.0f} | {read / us / 1e3:.1f} | {probe_us / us:.0%} |")


if __name__ == "__main__":
    main()
