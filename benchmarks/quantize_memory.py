"""Peak RSS and throughput of `ernie quantize` on a generated multi-GB bf16 checkpoint.

    python benchmarks/quantize_memory.py [--layers 4] [--formats int8,int4] [--workdir DIR] [--keep]

The checkpoint has the real ERNIE-4.5-21B-A3B tensor shapes (hidden 2560, 64 experts of 1536,
vocab 103424; hub layout, one tensor per expert) and fewer layers: 4 layers (1 dense + 3 MoE) make
5.5 GB in 5 shards. Each measurement runs in a fresh process that reports its own peak RSS
(VmHWM of /proc/self/status: ru_maxrss would also count the parent's memory at fork time).
Before each run the source's pages are dropped from the page cache
(posix_fadvise DONTNEED), so the throughput includes reading from disk. The load average is
printed too: the machine may be shared, and two busy neighbours halve what two cores can do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
import torch
mode, src, out, fmt = sys.argv[1:5]
def hwm():  # this process's own peak RSS; ru_maxrss would include the parent's at fork time
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
base = hwm()
t = time.perf_counter()
if mode == "quantize":
    from ernie_cli.quant.convert import quantize_checkpoint
    from ernie_cli.quant.spec import QuantSpec
    info = quantize_checkpoint(src, out, QuantSpec.make(fmt), force=True)
    extra = {"source_bytes": info["source_bytes"], "output_bytes": info["output_bytes"], "shards": info["shards"]}
else:
    from ernie_cli.weights.loader import load_model
    model = load_model(src, "cpu", torch.bfloat16)
    x = model(torch.tensor([[1, 2, 3, 4]]), 0)
    extra = {}
seconds = time.perf_counter() - t
peak = hwm()
print(json.dumps(dict(base=base, peak=peak, seconds=seconds, **extra)))
"""


def drop_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(*args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="1 dense + (layers-1) MoE layers of the 21B shapes (1.59 GB each)")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ernie-quant-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic checkpoint writer lives with the tests

    from synthetic import moe_config, write_synthetic_checkpoint

    raw = moe_config(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=args.layers, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, vocab_size=103424, moe_num_experts=64, moe_k=6,
        moe_intermediate_size=1536, moe_num_shared_experts=2,
    )
    work = args.workdir
    need = 1.59e9 * args.layers * 2.2
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < need:
        raise SystemExit(f"need about {need / 1e9:.0f} GB free under {work}, have {free / 1e9:.0f} GB")
    src = work / "src"
    try:
        t = time.perf_counter()
        write_synthetic_checkpoint(src, raw, shard_bytes=1 << 30)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"generated {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s: {src}")
        print(f"{'run':<18} {'source GB':>9} {'out GB':>7} {'s':>6} {'MB/s':>6} {'base MB':>8} {'peak MB':>8} {'over MB':>8}  load avg")
        for fmt in args.formats.split(","):
            out = work / f"out-{fmt}"
            drop_cache(src)
            load = os.getloadavg()[0]
            r = child("quantize", src, out, fmt)
            mbs = r["source_bytes"] / 1e6 / r["seconds"]
            print(
                f"{'quantize ' + fmt:<18} {r['source_bytes'] / 1e9:>9.2f} {r['output_bytes'] / 1e9:>7.2f} {r['seconds']:>6.1f} {mbs:>6.0f} "
                f"{r['base'] / 2**20:>8.0f} {r['peak'] / 2**20:>8.0f} {(r['peak'] - r['base']) / 2**20:>8.0f}  {load:.2f}"
            )
            disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            drop_cache(out)
            r = child("load", out, "-", "-")
            print(
                f"{'load ' + fmt:<18} {'':>9} {disk / 1e9:>7.2f} {r['seconds']:>6.1f} {disk / 1e6 / r['seconds']:>6.0f} "
                f"{r['base'] / 2**20:>8.0f} {r['peak'] / 2**20:>8.0f} {(r['peak'] - r['base']) / 2**20:>8.0f}  {os.getloadavg()[0]:.2f}"
            )
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
