#!/usr/bin/env bash
# The native CPU int kernels against torch's (ERNIE_QUANT_BACKEND=cpu) on the 8-layer int4 shape,
# alternated three times so that both see the same machine; then the DRAM read rate.
# Usage: bash benchmarks/cpu_native_ab.sh OUTDIR
set -u
OUT=$1; mkdir -p "$OUT"
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
for i in 1 2 3; do
  for be in native cpu; do
    ERNIE_QUANT_BACKEND=$([ $be = cpu ] && echo cpu) ernie bench --config $CFG --layers 8 --quantize int4 -t 2 -p 128 -n 64 -r 3 -o json > "$OUT/${be}_$i.json" 2>> "$OUT/err.txt"
  done
done
gcc -O3 -march=native -fopenmp benchmarks/cpu_bandwidth.c -o "$OUT/bw" && "$OUT/bw" > "$OUT/bandwidth.txt"
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
for be in ("native", "cpu"):
    for test in ("pp128", "tg64"):
        vals = [statistics.median(r["tokens_per_s"]) for i in (1, 2, 3) for r in json.loads((out / f"{be}_{i}.json").read_text()) if r["test"] == test]
        print(be, test, [round(v, 1) for v in vals], "median", round(statistics.median(vals), 1))
PY
