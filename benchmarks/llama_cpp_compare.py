"""ernie against llama.cpp on this CPU: the same random checkpoint, the same threads, interleaved runs.

Never run in CI (it writes tens of GB and takes tens of minutes). Steps:
1. llama.cpp's `llama-bench` and `llama-quantize`, built (CPU only, -DGGML_NATIVE=ON) from the source
   distribution of `llama-cpp-python` on PyPI (its vendor/llama.cpp), into
   $XDG_CACHE_HOME/ernie-bench/llama.cpp (default ~/.cache/...), reused when present.
2. A random bf16 checkpoint of ERNIE-4.5-21B-A3B's shapes cut to --layers layers (layer 0 dense, the
   rest MoE; tests/synthetic.py's writer) with the real tokenizer files (--tokenizer).
3. llama.cpp's own convert_hf_to_gguf.py (its gguf package put on PYTHONPATH from the same source,
   nothing installed) to BF16; llama-quantize to Q8_0 and Q4_0. `ernie quantize` to int8 and int4.
4. Per format, --rounds rounds of `llama-bench -t T` then `ernie bench -t T` (tg and pp as below,
   -r --reps each; each run's figure is the median of its repetitions). The work folder (about 45 GB for 8 layers) is deleted at the end unless --keep.
5. A table of tok/s, each round's figures and the ratio of the medians, with the CPU model, its
   vector flags, and the load average around each run (the machine may be shared).

Usage: python benchmarks/llama_cpp_compare.py [--work DIR] [--layers 8] [--threads 2] [--rounds 2]
                                              [--formats int4,int8,bf16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from synthetic import write_synthetic_checkpoint  # noqa: E402

CONFIG = ROOT / "benchmarks" / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "tokenizer.json")
# ernie format -> (llama.cpp type, prompt tokens, generated tokens), as docs/performance.md's table
TESTS = {"int4": ("Q4_0", 512, 64), "int8": ("Q8_0", 512, 64), "bf16": ("BF16", 128, 32)}
FLAGS_SHOWN = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    log("$", " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def load_avg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def cpu_description() -> str:
    model, flags = "?", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return f"{model}, {os.cpu_count()} CPUs; " + " ".join(f for f in FLAGS_SHOWN if f in flags)


# ---- llama.cpp ---------------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ernie-bench" / "llama.cpp"


def llama_cpp(cache: Path) -> tuple[Path, Path, Path, str]:
    """(llama-bench, llama-quantize, the llama.cpp source folder, its version), built once."""
    sdists = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
             "-d", cache / "sdist"], stdout=sys.stderr)
        sdists = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    src = cache / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache / "src", filter="data")
    build = cache / f"build-{version}"
    bench, quantize = build / "bin" / "llama-bench", build / "bin" / "llama-quantize"
    if not (bench.exists() and quantize.exists()):
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
             "-DGGML_METAL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], stdout=sys.stderr)
        run(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize", "-j", str(os.cpu_count() or 2)],
            stdout=sys.stderr)
    return bench, quantize, src, version


def llama_bench(bench: Path, gguf: Path, prompt: int, gen: int, threads: int, reps: int) -> dict[str, float]:
    out = run([bench, "-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", reps, "-o", "json"],
              capture_output=True, text=True).stdout
    rows = json.loads(out)
    return {("pp" if r["n_prompt"] else "tg"): statistics.median(r["samples_ts"]) for r in rows}


# ---- ernie -------------------------------------------------------------------------------------------


def ernie(*args) -> list[str]:
    return [sys.executable, "-m", "ernie_cli", *args]


def ernie_bench(model: Path, prompt: int, gen: int, threads: int, reps: int, checkout: Path = ROOT) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = run(ernie("bench", "-m", model, "-t", threads, "-p", prompt, "-n", gen, "-r", reps, "-o", "json"),
              capture_output=True, text=True, cwd=checkout, env=env).stdout
    rows = json.loads(out)
    return {("pp" if r["prompt_tokens"] else "tg"): statistics.median(r["tokens_per_s"]) for r in rows}


# ---- the run -----------------------------------------------------------------------------------------


def write_checkpoint(path: Path, layers: int, tokenizer: Path) -> Path:
    raw = json.loads(CONFIG.read_text())
    raw.update(num_hidden_layers=layers, moe_layer_end_index=layers - 1, num_nextn_predict_layers=0)
    write_synthetic_checkpoint(path, raw, shard_bytes=4 << 30)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, path / name)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="folder for the checkpoints (default: a new one in the temp dir)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--formats", default="int4,int8,bf16")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared" / "ernie-tokenizer")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--before", type=Path, help="another ernie checkout (e.g. a worktree of main), run as a third "
                    "engine after the other two in each round")
    args = ap.parse_args()
    formats = args.formats.split(",")
    engines = ["llama.cpp", "ernie"] + (["ernie before"] if args.before else [])
    bench, quantize, src, version = llama_cpp(cache_root())
    work = args.work or Path(tempfile.mkdtemp(prefix="ernie-vs-llama-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}; free disk {shutil.disk_usage(work).free / 1e9:.0f} GB")
    results: dict[str, dict[str, list[tuple[float, float, str]]]] = {}
    try:
        ckpt = work / "bf16"
        if not (ckpt / "config.json").exists():
            write_checkpoint(ckpt, args.layers, args.tokenizer)
        f16 = work / "model-BF16.gguf"
        if not f16.exists():
            env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
            run([sys.executable, src / "convert_hf_to_gguf.py", ckpt, "--outtype", "bf16", "--outfile", f16], env=env,
                stdout=sys.stderr)
        ggufs = {"bf16": f16}
        for fmt in formats:
            if fmt != "bf16":
                ggufs[fmt] = work / f"model-{TESTS[fmt][0]}.gguf"
                if not ggufs[fmt].exists():
                    run([quantize, f16, ggufs[fmt], TESTS[fmt][0], str(args.threads)], stdout=sys.stderr)
        ernie_dirs = {"bf16": ckpt}
        for fmt in formats:
            if fmt != "bf16":
                ernie_dirs[fmt] = work / f"ernie-{fmt}"
                if not (ernie_dirs[fmt] / "config.json").exists():
                    run(ernie("quantize", ckpt, ernie_dirs[fmt], "--format", fmt), cwd=ROOT, stdout=sys.stderr)
        for fmt in formats:
            _, prompt, gen = TESTS[fmt]
            for r in range(args.rounds):
                for engine in engines:
                    before = load_avg()
                    if engine == "llama.cpp":
                        got = llama_bench(bench, ggufs[fmt], prompt, gen, args.threads, args.reps)
                    else:
                        checkout = ROOT if engine == "ernie" else args.before
                        got = ernie_bench(ernie_dirs[fmt], prompt, gen, args.threads, args.reps, checkout)
                    for kind, tps in got.items():
                        results.setdefault(f"{fmt} {kind}", {}).setdefault(engine, []).append((tps, r, f"{before}-{load_avg()}"))
                    log(f"{fmt} round {r} {engine}: {got} (load {before} -> {load_avg()})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"CPU: {cpu_description()}")
    print(f"{time.strftime('%Y-%m-%d')}, ernie {commit}, llama.cpp from llama-cpp-python {version}; -t {args.threads}, "
          f"{args.layers} layers, {args.rounds} interleaved rounds of -r {args.reps}")
    print()
    before = " ernie before tok/s | ratio |" if args.before else ""
    print(f"| test | llama.cpp tok/s | ernie tok/s | ratio of medians |{before} load average |")
    print("|---|---:|---:|---:|" + ("---:|---:|" if args.before else "") + "---|")
    # each run: the median of its repetitions (a shared machine's busy moment spoils one, not the figure)

    def median(runs):
        return statistics.median(t for t, *_ in runs) if runs else float("nan")

    def listed(runs):
        return ", ".join(f"{t:.1f}" for t, *_ in runs)

    for key, runs in results.items():
        fmt, kind = key.split()
        _, prompt, gen = TESTS[fmt]
        name = f"{fmt} / {TESTS[fmt][0]} {kind}{prompt if kind == 'pp' else gen}"
        llama, ours, old = runs.get("llama.cpp", []), runs.get("ernie", []), runs.get("ernie before", [])
        extra = f" {listed(old)} | {median(old) / median(llama):.2f} |" if args.before else ""
        values = [float(x) for *_, load in llama + ours + old for x in load.split("-")]
        loads = f"{min(values):.2f}–{max(values):.2f}" if values else ""
        print(f"| {name} | {listed(llama)} | {listed(ours)} | **{median(ours) / median(llama):.2f}** |{extra} {loads} |")


if __name__ == "__main__":
    main()
