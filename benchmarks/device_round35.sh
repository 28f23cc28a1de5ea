#!/usr/bin/env bash
# Device call 35 (issue 7, seventh session): the tests round 33 ran out of time for (the model with
# dp4a against the CPU kernels, the last two kernel cases, the router), then the full int4 model with
# dp4a (round 34's run hit its 140 s limit) and the byte loop again in the same call.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 110 python3 -m pytest -q -rf --tb=short tests/test_quant_cuda.py tests/test_gpu_gemv.py -k "quant_cuda or router or 37-24-dtype1" 2>&1 | tail -8
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], [round(t,1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run full_int4_dp4a 230 env ERNIE_DP4A=1 $B --quantize int4
run full_int4_bytes 160 env ERNIE_DP4A=0 $B --quantize int4
