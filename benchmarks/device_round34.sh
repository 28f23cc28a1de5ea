#!/usr/bin/env bash
# Device call 34 (issue 7, seventh session): the full 28-layer model with and without the dp4a GEMVs
# (ERNIE_DP4A=1), int4 and int8, in one call, the order mixed.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], [round(t,1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); rm -f $OUT/$name.err; }
run full_int4_bytes 140 env ERNIE_DP4A=0 $B --quantize int4
run full_int4_dp4a 140 env ERNIE_DP4A=1 $B --quantize int4
run full_int8_dp4a 140 env ERNIE_DP4A=1 $B --quantize int8
run full_int8 140 env ERNIE_DP4A=0 $B --quantize int8
