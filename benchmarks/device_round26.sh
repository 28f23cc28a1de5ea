#!/usr/bin/env bash
# Device call 26 (issue 7, sixth session): the int4 word kernel after the partial-group fix: the GEMV
# and quantized-model tests, its kernel table with the tuner's picks, and the full int4 model's decode.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python3 -m pytest -q -rf --tb=line tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | tail -6
timeout 60 python3 benchmarks/gpu_gemv_bench.py int4 2>&1 | grep -v -i warn | tail -16
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int4"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), round(r['peak_memory_bytes']/2**30,2), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run full_int4 250 $B
