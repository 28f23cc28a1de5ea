#!/usr/bin/env bash
# Device call 39 (issue 7, branch wip/int8-dp4a-selective, for the next session): int8 weights round x for
# dp4a only in the routed experts and the head (ERNIE_INT8_DP4A=all: every int8 product, as on main).
# 8-layer int8 decode alternating, then the full int8 model both ways.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -rf --tb=short tests/test_quant_cuda.py 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int8"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); rm -f $OUT/$name.err; }
for round in 1 2; do for m in all selective; do run l8_int8_${m}_$round 70 env ERNIE_INT8_DP4A=$m $B --layers 8; done; done
for m in selective all; do run full_int8_$m 170 env ERNIE_INT8_DP4A=$m $B; done
