#!/usr/bin/env bash
# The CPU figures of docs/performance.md, on the 2-core development machine, one after another.
# Usage: bash benchmarks/cpu_run.sh OUTDIR BIGDIR   (BIGDIR needs ~60 GB free for the full-size run)
set -u
OUT=$1; BIG=$2; mkdir -p "$OUT" "$BIG"
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
date > "$OUT/date.txt"; lscpu | grep "Model name" >> "$OUT/date.txt"; python -c "import torch; print(torch.__version__)" >> "$OUT/date.txt"
python benchmarks/load_memory.py --gb 1.0 > "$OUT/load_memory.md" 2> "$OUT/load_memory.err"
ernie bench --config $CFG --layers 4 --dtype bfloat16 -t 2 -p 128 -n 32 -r 3 -o json > "$OUT/ours_4l_bf16.json" 2> "$OUT/ours.err"
python benchmarks/hf_baseline.py $CFG --layers 4 --device cpu --experts grouped_mm -p 128 -n 32 -r 3 > "$OUT/hf_4l_bf16.json" 2> "$OUT/hf.err"
# Issue 8: the full-size model, generated, quantized offline to int4 on this machine, then measured.
python -c "
import json, time
from ernie_cli.quant.synthetic import write_synthetic_checkpoint
t = time.time(); write_synthetic_checkpoint('$BIG/src', json.load(open('$CFG')), shard_bytes=4 << 30)
print('generated in', round(time.time() - t), 's')" > "$OUT/generate.txt" 2>&1
du -sb "$BIG/src" >> "$OUT/generate.txt"
/usr/bin/time -v ernie quantize "$BIG/src" "$BIG/int4" --format int4 > "$OUT/quantize.txt" 2> "$OUT/quantize.err"
du -sb "$BIG/int4" >> "$OUT/quantize.txt"
rm -rf "$BIG/src"
/usr/bin/time -v ernie bench -m "$BIG/int4" -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/int4_full.json" 2> "$OUT/int4_full.err"
echo done >> "$OUT/date.txt"
