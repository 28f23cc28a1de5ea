#!/usr/bin/env bash
# Device call 18 (issue 7, fifth session): int8/int4 one-token products on the tensor cores
# (gpu_gemv._gemv_mma): float64 tests, the kernel table against the CUDA-core kernels (:fma), and the
# 8-layer int4/int8 decode with each (ERNIE_GEMV_TENSOR_CORES=0 is the CUDA-core kernel).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py 2>&1 | tail -4
timeout 200 python3 benchmarks/gpu_gemv_bench.py int4 int4:fma int8 int8:fma 2>&1 | grep -v -i warn | tail -32
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run int4_mma 80 $B --quantize int4
run int4_fma 80 env ERNIE_GEMV_TENSOR_CORES=0 $B --quantize int4
run int8_mma 80 $B --quantize int8
run int8_fma 80 env ERNIE_GEMV_TENSOR_CORES=0 $B --quantize int8
