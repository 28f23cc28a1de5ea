#!/usr/bin/env bash
# Device call 11 (issue 7): round 10's changes checked (kernel tests, parity, compiled vs eager),
# the int4 kernel table (K=1024 tiles), then the 8-layer bf16/int4 comparison shapes and the full int8 decode.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | grep -v "^\s*$" | tail -25
timeout 60 python3 benchmarks/gpu_gemv_bench.py int4 2>&1 | grep "^|" | tail -8
timeout 160 python3 benchmarks/cuda_parity.py > $OUT/parity.txt 2>&1; grep "^|" $OUT/parity.txt || tail -5 $OUT/parity.txt
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json --compile on"
run() { name=$1; shift; timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name: "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run bf16_8l 60 $B --layers 8 -p 512 -n 128
run int4_8l 70 $B --layers 8 -p 0 -n 128 --quantize int4
run int8_full 140 $B -p 0 -n 128 --quantize int8
