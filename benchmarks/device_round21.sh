#!/usr/bin/env bash
# Device call 21 (issue 7, fifth session): the int4 GEMV that reads x contiguously (round 20's form 5,
# now gpu_gemv.INT4_FORM=1): float64 tests, 8-layer int4 decode alternating with the loop before it
# (ERNIE_INT4_FORM=0), and the full int4 model's decode.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int4"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), round(r['peak_memory_bytes']/2**30,2), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
for round in 1 2; do for f in 0 1; do run l8_form${f}_$round 75 env ERNIE_INT4_FORM=$f $B --layers 8; done; done
run full_int4 200 $B
