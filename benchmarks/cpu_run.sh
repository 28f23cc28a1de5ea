#!/usr/bin/env bash
# The CPU figures of docs/performance.md, one after another, on an idle machine.
# Usage: bash benchmarks/cpu_run.sh OUTDIR [BIGDIR]
#   always: loading memory, 4 layers of the 21B-A3B shape in bf16 against transformers, and the
#           8-layer comparison shape (layer 0 dense, 1-7 MoE) in int4, int8 and bf16 against transformers;
#   with BIGDIR (about 60 GB free): the full-size model generated with random weights, quantized to
#           int4 by `ernie quantize` under /usr/bin/time -v, then `ernie bench` on it.
# Each `ernie bench` writes JSON into OUTDIR; the medians are printed last.
set -u
OUT=$1; BIG=${2:-}; mkdir -p "$OUT"
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
{ date; lscpu | grep "Model name"; python -c "import torch; print(torch.__version__)"; } > "$OUT/machine.txt"
python benchmarks/load_memory.py --gb 1.0 > "$OUT/load_memory.md" 2> "$OUT/load_memory.err"
ernie bench --config $CFG --layers 4 --dtype bfloat16 -t 2 -p 128 -n 32 -r 3 -o json > "$OUT/bf16_4l.json" 2> "$OUT/err.txt"
python benchmarks/hf_baseline.py $CFG --layers 4 --device cpu --experts grouped_mm -p 128 -n 32 -r 3 > "$OUT/hf_4l.jsonl" 2>> "$OUT/err.txt"
ernie bench --config $CFG --layers 8 --quantize int4 -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/int4_8l.json" 2>> "$OUT/err.txt"
ernie bench --config $CFG --layers 8 --quantize int8 -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/int8_8l.json" 2>> "$OUT/err.txt"
ernie bench --config $CFG --layers 8 --dtype bfloat16 -t 2 -p 0 -n 64 -r 3 -o json > "$OUT/bf16_8l.json" 2>> "$OUT/err.txt"
python benchmarks/hf_baseline.py $CFG --layers 8 --device cpu --experts grouped_mm -p 64 -n 32 -r 3 > "$OUT/hf_8l.jsonl" 2>> "$OUT/err.txt"
if [ -n "$BIG" ]; then
  mkdir -p "$BIG"
  PYTHONPATH=tests python -c "
import json, time
from synthetic import write_synthetic_checkpoint
t = time.time(); write_synthetic_checkpoint('$BIG/src', json.load(open('$CFG')), shard_bytes=4 << 30)
print('generated in', round(time.time() - t), 's')" > "$OUT/generate.txt" 2>&1
  /usr/bin/time -v ernie quantize "$BIG/src" "$BIG/int4" --format int4 > "$OUT/quantize.txt" 2> "$OUT/quantize.err"
  du -sb "$BIG/int4" >> "$OUT/quantize.txt"
  rm -rf "$BIG/src"
  /usr/bin/time -v ernie bench -m "$BIG/int4" -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/int4_full.json" 2> "$OUT/int4_full.err"
fi
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
print("| run | test | median tok/s |\n|---|---|---:|")
for path in sorted(Path(sys.argv[1]).glob("*.json*")):
    text = path.read_text().strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.startswith("{")]
    for r in rows:
        tps = r["median_tokens_per_s"] if "median_tokens_per_s" in r else statistics.median(r["tokens_per_s"])
        print(f"| {path.stem} | {r['test']} | {tps:.1f} |")
PY
