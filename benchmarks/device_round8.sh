#!/usr/bin/env bash
# The variants 3 and 4 were removed after this run (slower); they exist at commit bf5378d.
# Device call 8 (issue 7): three int4 GEMV inner loops (ERNIE_INT4_GEMV=2: per-group reshape and
# reduce; 3: dequantized in registers with per-column scale gathers; 4: one group per step), the
# kernel table for each, then the 8-layer int4 decode with the fastest on the head.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
best=2; best_rate=0
for v in 2 3 4; do
  ERNIE_INT4_GEMV=$v timeout 60 python3 benchmarks/gpu_gemv_bench.py int4 2>/dev/null | grep "^| int4" > $OUT/v$v.txt
  echo "variant $v"; cat $OUT/v$v.txt
  rate=$(grep head $OUT/v$v.txt | awk -F'|' '{gsub(/[ ,]/,"",$6); print $6}')
  [ -n "$rate" ] && [ "$rate" -gt "$best_rate" ] && best=$v && best_rate=$rate
done
echo "fastest on the head: $best ($best_rate GB/s)"
ERNIE_INT4_GEMV=$best timeout 40 python3 -m pytest -q -x tests/test_gpu_gemv.py 2>&1 | tail -1
ERNIE_INT4_GEMV=$best timeout 70 python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -r 5 -p 0 -n 128 -o json --compile on --quantize int4 > $OUT/int4_8l.json 2> $OUT/int4_8l.err
python3 -c "
import json,statistics
for r in json.load(open('$OUT/int4_8l.json')): print('int4 8 layers variant $best', r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0))" || grep -v -i warn $OUT/int4_8l.err | tail -3
