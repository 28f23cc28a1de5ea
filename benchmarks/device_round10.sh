#!/usr/bin/env bash
# Device call 10 (issue 7): the router tail as one Triton kernel, every one-token linear on the
# Triton GEMV, q/k/v as one matrix in the decode graph, K=1024 tiles for the tuner. Kernel and parity
# checks first, then the bf16 profile and bench, then the int4 profile (its step time is tg rate).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | tail -3
timeout 120 python3 benchmarks/cuda_parity.py 2>&1 | grep -v -i warn | tail -16
timeout 90 python3 benchmarks/gpu_profile.py $CFG 2>&1 | grep -v -i warn > $OUT/profile_bf16.txt; tail -15 $OUT/profile_bf16.txt
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json --compile on"
timeout 100 $B -p 512 -n 128 > $OUT/bf16_full.json 2> $OUT/bf16_full.err
python3 -c "
import json,statistics
for r in json.load(open('$OUT/bf16_full.json')): print('bf16 full', r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0))" || grep -v -i warn $OUT/bf16_full.err | tail -3
timeout 200 python3 benchmarks/gpu_profile.py $CFG --quantize int4 2>&1 | grep -v -i warn > $OUT/profile_int4.txt; tail -15 $OUT/profile_int4.txt
