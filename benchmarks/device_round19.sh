#!/usr/bin/env bash
# Device call 19 (issue 7, fifth session): four inner loops of the int4 GEMV (gpu_gemv.INT4_FORM:
# 0 as shipped; 1 group sums kept per (row, group) and the code offset folded into the zero; 2 as 1
# with magic-number conversion; 3 as 1 with a 3-D load instead of a reshape), kernel table and
# 8-layer int4 decode with each, then where an 8-layer int4 decode step goes.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 benchmarks/gpu_gemv_bench.py int4:0 int4:1 int4:2 int4:3 2>&1 | grep -v -i warn | tail -30
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int4"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
for f in 0 1 2 3; do run int4_form$f 75 env ERNIE_INT4_FORM=$f $B; done
timeout 100 python3 benchmarks/gpu_profile.py $CFG --layers 8 --quantize int4 2>&1 | grep -v -i warn | tail -40
