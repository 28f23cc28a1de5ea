#!/usr/bin/env bash
# Device call 33 (issue 7, seventh session): the dp4a GEMVs (ERNIE_DP4A=1). Tests, the kernel table
# against the float kernels, and 8-layer decode alternating with the defaults.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 200 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | tail -12
timeout 150 python3 benchmarks/gpu_gemv_bench.py int4:bytes int4:words int4:dp4a int8 int8:dp4a > $OUT/kernels.txt 2>&1; grep "^|\|dp4a" $OUT/kernels.txt || tail -5 $OUT/kernels.txt
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --layers 8"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run l8_int4_bytes_1 70 env ERNIE_DP4A=0 $B --quantize int4
run l8_int4_dp4a_1 70 env ERNIE_DP4A=1 $B --quantize int4
run l8_int8_1 70 env ERNIE_DP4A=0 $B --quantize int8
run l8_int8_dp4a_1 70 env ERNIE_DP4A=1 $B --quantize int8
run l8_int4_bytes_2 70 env ERNIE_DP4A=0 $B --quantize int4
run l8_int4_dp4a_2 70 env ERNIE_DP4A=1 $B --quantize int4
