"""One `ernie complete` in a fresh process, as a user runs it: the whole wall time, against the floor
of starting torch on the GPU, on checkpoints written here.

Usage (GPU machine, repository root):
  python benchmarks/oneshot.py TOKENIZER_DIR WORK_DIR [--layers 8] [--runs 3] [--rows ROW,...] [--hf]

Rows (all by default):
  floor   python3 -c "import torch; torch.zeros(1, device='cuda')": F, which the targets are above
  cold    bf16, -n 64, the first run with empty ernie and Triton caches (as after an install)
  bf16    bf16, -n 64, caches warm (median of --runs)
  int4    an int4 directory in `ernie quantize`'s format, -n 64, caches warm
  long    bf16, a 1,000-token prompt from stdin, -n 64
  full    the full 21B-A3B as an int4 directory (11.6 GB), -n 64
  load    the full 21B-A3B in bf16 (43.7 GB, a sparse file read back as zeros): page cache to GPU
  n512    bf16, -n 512: complete's own decode rate against `ernie bench` tg128 on the same directory
          (last: the bench's step is captured as complete's is)
  hf      (with --hf) transformers from_pretrained + generate, greedy, -n 64, on the bf16 directory

Checkpoints: the real 21B-A3B shapes (benchmarks/configs) cut to --layers layers, random weights
drawn on the GPU; the int4 directories hold random codes with small scales. Every run reads its
checkpoint from the page cache (each is read once before timing). Prints one JSON line per run and a
table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ernie_cli.model.config import parse_config
from ernie_cli.quant.io import OutTensor, ShardWriter
from ernie_cli.quant.load import expected_tensors
from ernie_cli.quant.spec import QuantSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the hub-layout tensor list lives with the tests
from synthetic import hub_tensors  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json"
PROMPT = "The capital of France is"
ROWS = ("floor", "cold", "bf16", "int4", "long", "full", "load", "n512")


def _values(t: OutTensor, gen: torch.Generator) -> torch.Tensor:
    dev = gen.device
    if t.dtype == torch.uint8:
        return torch.randint(0, 256, t.shape, dtype=torch.uint8, device=dev, generator=gen)
    if t.dtype == torch.int8:
        return torch.randint(-127, 128, t.shape, dtype=torch.int8, device=dev, generator=gen)
    if t.name.endswith("norm.weight"):
        return torch.ones(t.shape, device=dev)
    if t.name.endswith(("scales", "zeros")):
        return torch.full(t.shape, 0.002 if t.name.endswith("scales") else 0.0, device=dev)
    scale = 0.1 if t.name.endswith("gate.weight") else 0.01 if "bias" in t.name else 0.02
    return torch.randn(t.shape, device=dev, generator=gen) * scale


class HollowShardWriter(ShardWriter):
    """A ShardWriter that can leave a tensor's bytes as a hole (read back as zeros, no disk used)."""

    def hole(self, t: OutTensor) -> None:
        if self._left_in_shard == 0:
            self._open_next_shard()
        self._file.seek(t.nbytes, os.SEEK_CUR)
        self._next += 1
        self._left_in_shard -= 1

    def _close_file(self) -> None:
        if self._file is not None:  # a shard that ends in a hole: its length is set by the seek alone
            self._file.truncate(self._file.tell())
        super()._close_file()


def write_checkpoint(path: Path, raw: dict, tensors: list[OutTensor], tokenizer: Path, hollow: bool = False) -> Path:
    """config.json, the tokenizer's files and `tensors` with random values (hollow: only tensors under
    a megabyte and the embedding hold values; the rest are holes, read back as zeros)."""
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    writer = (HollowShardWriter if hollow else ShardWriter)(tmp, tensors, 5 << 30)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t in writer.order:
        if hollow and t.nbytes >= 1 << 20 and not t.name.endswith("embed_tokens.weight"):
            writer.hole(t)
        else:
            writer.write(t.name, _values(t, gen).to(t.dtype).cpu())
    writer.finish()
    tmp.rename(path)
    return path


def int4_tensors(raw: dict) -> tuple[dict, list[OutTensor]]:
    spec = QuantSpec.make("int4")
    cfg = parse_config(raw)
    out = []
    for name, (shape, dtype) in expected_tensors(cfg, spec).items():
        out.append(OutTensor(name, dtype or torch.bfloat16, tuple(shape)))
    return dict(raw, quantization_config=spec.to_config()), out


def warm_page_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run(cmd: list[str], env: dict, stdin: bytes | None = None) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env)
    wall = time.perf_counter() - start
    out = {"wall_s": wall, "rc": proc.returncode}
    try:
        out["json"] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        out["stdout"] = proc.stdout.decode(errors="replace")[-300:]
    if proc.returncode:
        out["stderr"] = proc.stderr.decode(errors="replace")[-1500:]
    return out


def complete(model: Path, env: dict, n: int = 64, stdin: bytes | None = None) -> dict:
    cmd = [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model), "--device", "cuda", "-t", "0", "-n", str(n),
           "--ignore-eos", "--json", "-q"]
    cmd += ["-"] if stdin is not None else [PROMPT]
    return run(cmd, env, stdin)


def stage_line(r: dict) -> str:
    stages = r.get("json", {}).get("timings", {}).get("stages", {})
    return ", ".join(f"{k} {v:.2f}" for k, v in stages.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--hf", action="store_true")
    args = ap.parse_args()
    rows_wanted = args.rows.split(",") + (["hf"] if args.hf else [])
    full = json.loads(CONFIG.read_text())
    cut = dict(full, num_hidden_layers=args.layers, moe_layer_end_index=min(full.get("moe_layer_end_index", args.layers), args.layers - 1))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bf16 = write_checkpoint(work / f"bf16-{args.layers}", cut, hub_tensors(cut), args.tokenizer)
    int4 = write_checkpoint(work / f"int4-{args.layers}", *int4_tensors(cut), args.tokenizer) if "int4" in rows_wanted else None
    full_int4 = write_checkpoint(work / "int4-full", *int4_tensors(full), args.tokenizer) if "full" in rows_wanted else None
    hollow = write_checkpoint(work / "bf16-full-hollow", full, hub_tensors(full), args.tokenizer, hollow=True) if "load" in rows_wanted else None
    print(f"checkpoints ready in {time.perf_counter() - t0:.1f} s", flush=True)
    for p in (bf16, int4, full_int4, hollow):
        if p is not None:
            warm_page_cache(p)

    caches = work / "caches"
    shutil.rmtree(caches, ignore_errors=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(caches), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        env.pop(var, None)  # ernie puts both under XDG_CACHE_HOME/ernie
    class Table(list):
        def append(self, row):  # each row is printed as soon as it is known, and all again at the end
            print("ROW | " + " | ".join(row) + " |", flush=True)
            super().append(row)

    table = Table()

    def log(name, r):
        print(json.dumps({"row": name, **{k: v for k, v in r.items() if k != "json"}, "stages": stage_line(r)}), flush=True)

    floor = None
    if "floor" in rows_wanted:
        fs = [run([sys.executable, "-c", "import torch; torch.zeros(1, device='cuda')"], env)["wall_s"] for _ in range(args.runs)]
        floor = statistics.median(fs)
        table.append(("F: import torch + CUDA context", f"{floor:.2f}", "-"))

    def minus_f(w):
        return f"{w - floor:.2f}" if floor is not None else "-"

    if "cold" in rows_wanted:
        r = complete(bf16, env)
        log("cold", r)
        table.append(("bf16 -n 64, first run (empty caches)", f"{r['wall_s']:.2f}", minus_f(r["wall_s"]) + f" ({stage_line(r)})"))

    def warm_row(name, label, model, n=64, stdin=None, runs=None):
        complete(model, env, n, stdin)  # caches warm for this model and shape
        rs = [complete(model, env, n, stdin) for _ in range(runs or args.runs)]
        for r in rs:
            log(name, r)
        w = statistics.median(r["wall_s"] for r in rs)
        mid = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
        table.append((label, f"{w:.2f}", minus_f(w) + f" ({stage_line(mid)})"))
        return rs

    if "bf16" in rows_wanted:
        warm_row("bf16", "bf16 -n 64, caches warm", bf16)
    if "int4" in rows_wanted:
        warm_row("int4", "int4 directory -n 64, caches warm", int4)
    if "long" in rows_wanted:
        words = ("the quick brown fox jumps over the lazy dog near a quiet river bank " * 200).encode()
        warm_row("long", "bf16, ~1,000-token prompt on stdin, -n 64", bf16, stdin=words[: 4 * 1000])
    if "full" in rows_wanted:
        warm_row("full", "full 21B-A3B int4 directory, -n 64", full_int4, runs=1)
    if "load" in rows_wanted:
        rs = warm_row("load", "full 21B-A3B bf16 (hollow) -n 64", hollow, runs=1)
        gb = sum(f.stat().st_size for f in hollow.glob("*.safetensors")) / 1e9
        secs = statistics.median(r["json"]["timings"]["stages"]["weights"] for r in rs if "json" in r)
        table.append(("  weights: page cache to GPU", f"{secs:.2f} s for {gb:.1f} GB", f"{gb / secs:.1f} GB/s"))
    if "n512" in rows_wanted:
        rs = warm_row("n512", "bf16 -n 512", bf16, n=512)
        rate = statistics.median(r["json"]["timings"]["decode_tokens_per_s"] for r in rs if "json" in r)
        b = subprocess.run([sys.executable, "-m", "ernie_cli", "bench", "-m", str(bf16), "--device", "cuda", "-p", "0", "-n", "128",
                            "-r", "3", "-o", "json"], capture_output=True, env=env, text=True)
        try:
            tg = statistics.median(json.loads(b.stdout)[0]["tokens_per_s"])
        except (ValueError, IndexError, KeyError):
            print(b.stderr[-1500:], flush=True)
            tg = 0
        table.append(("  complete's decode rate / bench tg128", f"{rate:.1f} / {tg:.1f} tok/s", f"{rate / tg:.1%}" if tg else "-"))
    if "hf" in rows_wanted:
        code = (
            "import time,torch,sys;t=time.perf_counter();from transformers import AutoModelForCausalLM,AutoTokenizer;"
            f"m=AutoModelForCausalLM.from_pretrained('{bf16}',dtype=torch.bfloat16,device_map='cuda');tok=AutoTokenizer.from_pretrained('{bf16}');"
            "l=time.perf_counter()-t;ids=tok('" + PROMPT + "',return_tensors='pt').input_ids.cuda();t=time.perf_counter();"
            "m.generate(ids,max_new_tokens=64,min_new_tokens=64,do_sample=False);print(f'load {l:.1f} s, generate {time.perf_counter()-t:.1f} s',file=sys.stderr)"
        )
        r = run([sys.executable, "-c", code], env)
        log("hf", r)
        table.append(("transformers from_pretrained + generate, -n 64", f"{r['wall_s']:.2f}", minus_f(r["wall_s"])))

    card = torch.cuda.get_device_name()
    print(f"\n{card}, torch {torch.__version__}, {args.layers}-layer checkpoints, medians of {args.runs} (full-model rows: one run after a first)")
    print("| run | wall s | wall - F s (stages) |\n|---|---:|---|")
    for label, wall, above in table:
        print(f"| {label} | {wall} | {above} |")


if __name__ == "__main__":
    main()
