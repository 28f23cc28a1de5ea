#!/usr/bin/env bash
# Device call 6 (issue 7): the kernel table, then ernie bench with the Triton GEMVs: full 21B-A3B
# shape in bf16, int8 and int4, and the 8-layer shape of the llama.cpp figures.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 100 python3 benchmarks/gpu_gemv_bench.py 2>&1 | grep -v -i warn | tail -16
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json --compile on"
run() { name=$1; shift; timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name: "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run bf16_full 110 $B -p 512 -n 128
run int8_full 130 $B -p 512 -n 128 --quantize int8
run int4_full 130 $B -p 0 -n 128 --quantize int4
run bf16_8l 60 $B --layers 8 -p 512 -n 128
run int4_8l 60 $B --layers 8 -p 0 -n 128 --quantize int4
