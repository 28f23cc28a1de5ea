#!/usr/bin/env bash
# Device call 38 (issue 7, branch wip/swiglu-in-down, for the next session): the routed experts' down
# product forms silu(gate) * up while loading x (ERNIE_SWIGLU_IN_DOWN=0: a torch kernel writes it
# first, as on main). Tests, then 8-layer int4/int8 decode alternating, then the full int4 model.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py tests/test_quant_cuda.py -k "silu or quant_cuda" 2>&1 | tail -5
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); rm -f $OUT/$name.err; }
for round in 1 2; do for f in 0 1; do run l8_int4_fuse${f}_$round 70 env ERNIE_SWIGLU_IN_DOWN=$f $B --layers 8 --quantize int4; done; done
for f in 1 0; do run full_int4_fuse$f 200 env ERNIE_SWIGLU_IN_DOWN=$f $B --quantize int4; done
