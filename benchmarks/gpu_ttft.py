"""`ernie complete` on the GPU with the full 21B-A3B shape: time to the first and second printed token,
cold (empty Inductor and Triton caches) and warm, with weight reading from disk taken out.

Usage (GPU machine): python benchmarks/gpu_ttft.py CONFIG TOKENIZER_DIR WORK_DIR [--runs 3]

The checkpoint is hollow: only the embedding (also the tied head), norms and routers hold random
values; every other tensor is a hole in a sparse file, read back as zeros. It has the real names,
shapes and 43.7 GB of the release, so the loader, the memory check, the copy to the GPU and the
compile do all their work, but nothing comes from the disk (the time that would take depends on
the disk, so the figure is given without it), and the 64 GB disk of the GPU machine
need not hold a real copy. With the layers' matrices zero the model still produces varied tokens:
the embedding goes through the final norm into the tied head.

Each run is a fresh `ernie complete -n 16 -t 0 --ignore-eos` process; its stdout is read as it
comes, so the first chunk marks the first token (from the prefill) and the second chunk the
second (the first decode step, which in a new process first traces and compiles the CUDA graph).
The first run starts with empty compile caches (cold); the later ones reuse what it left (warm).
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

import torch

from ernie_cli.quant.io import ShardWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic checkpoint writer lives with the tests
from synthetic import hub_tensors

HOLE_FROM = 1 << 20  # tensors of a megabyte and more are left as holes, except the embedding


class HollowWriter(ShardWriter):
    def write(self, name: str, tensor: torch.Tensor | None) -> None:  # type: ignore[override]
        want = self.order[self._next]
        if tensor is not None:
            return super().write(name, tensor)
        if self._left_in_shard == 0:
            self._open_next_shard()
        self._file.seek(want.nbytes, os.SEEK_CUR)
        self._next += 1
        self._left_in_shard -= 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.truncate(self._file.tell())  # a trailing hole must still count in the size
        super()._close_file()


def write_hollow(path: Path, raw: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    writer = HollowWriter(path, hub_tensors(raw), 5 << 30)
    gen = torch.Generator().manual_seed(0)
    for t in writer.order:
        if t.name.endswith("norm.weight"):
            value = torch.ones(t.shape)
        elif t.nbytes < HOLE_FROM or t.name.endswith("embed_tokens.weight"):
            value = torch.randn(t.shape, generator=gen) * (0.1 if "gate.weight" in t.name else 1.0)
        else:
            writer.write(t.name, None)
            continue
        writer.write(t.name, value.to(t.dtype))
    writer.finish()


def run_once(model: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model), "-n", "16", "-t", "0", "--ignore-eos", "The capital of France is"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    chunks = []
    while True:
        data = os.read(proc.stdout.fileno(), 4096)
        if not data:
            break
        chunks.append(time.perf_counter() - start)
    err = proc.stderr.read().decode(errors="replace")
    proc.wait()
    stats = [line for line in err.splitlines() if "prompt tokens" in line]
    return {"rc": proc.returncode, "first_s": chunks[0] if chunks else None, "second_s": chunks[1] if len(chunks) > 1 else None,
            "total_s": time.perf_counter() - start, "stats": stats[-1] if stats else err.strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("tokenizer")
    ap.add_argument("work")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    model = work / "hollow"
    raw = json.loads(Path(args.config).read_text())
    t0 = time.perf_counter()
    write_hollow(model, raw)
    for f in Path(args.tokenizer).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, model / f.name)
    print(f"hollow checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)
    caches = work / "caches"
    shutil.rmtree(caches, ignore_errors=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"),
               XDG_CACHE_HOME=str(caches / "xdg"), HF_HUB_OFFLINE="1")
    rows = []
    for i in range(args.runs):
        r = run_once(model, env)
        r["run"] = "cold" if i == 0 else "warm"
        rows.append(r)
        print(json.dumps(r), flush=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{card}, torch {torch.__version__}")
    print("| run | first token s | second token s | whole -n 16 s | ernie's own line |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['run']} | {r['first_s'] or 0:.2f} | {r['second_s'] or 0:.2f} | {r['total_s']:.1f} | {r['stats']} |")


if __name__ == "__main__":
    main()
