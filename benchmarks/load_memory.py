"""Peak host memory of loading a generated bf16 checkpoint, measured in a fresh process.

Usage: python benchmarks/load_memory.py [--gb 1.0] [--dir /tmp/ernie-load-memory]
Writes a random ERNIE-shaped MoE checkpoint of about --gb GB (hub layout, 2 shards), then loads it
with ernie_cli.weights.loader.load_model on the CPU in bf16 in a subprocess and prints the child's peak RSS
(VmHWM) before and after, against the size on disk.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic checkpoint writer lives with the tests

from synthetic import moe_config, write_synthetic_checkpoint

CHILD = """
import json, sys, time, torch
from ernie_cli.weights.loader import load_model
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
base = hwm(); t = time.perf_counter()
model = load_model(sys.argv[1], "cpu", torch.bfloat16)
print(json.dumps({"base": base, "peak": hwm(), "seconds": time.perf_counter() - t,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/ernie-load-memory")
    args = ap.parse_args()
    path = Path(args.dir)
    shutil.rmtree(path, ignore_errors=True)
    layers = max(2, round(args.gb / 0.05))  # ~48 MiB per layer plus a 62 MiB embedding at these sizes
    write_synthetic_checkpoint(path, moe_config(num_hidden_layers=layers), shard_bytes=int(args.gb * 1e9 / 2) + 1)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.splitlines()[-1])
    mb = 1024 * 1024
    print("| checkpoint on disk | parameters loaded | peak RSS | baseline (python + torch) | peak - baseline | load time |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {size / mb:,.0f} MiB | {r['param_bytes'] / mb:,.0f} MiB | {r['peak'] / mb:,.0f} MiB | {r['base'] / mb:,.0f} MiB "
          f"| {(r['peak'] - r['base']) / mb:,.0f} MiB ({(r['peak'] - r['base']) / size:.2f}x the size) | {r['seconds']:.1f} s |")
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
