#!/usr/bin/env bash
# Device call 9 (issue 7): kernel tests, the GEMV table timed inside CUDA graphs (magic-number code
# conversion against int-to-float), then where a compiled decode step's time goes (bf16 and int4).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 -m pytest -q tests/test_gpu_gemv.py 2>&1 | tail -2
timeout 240 python3 benchmarks/gpu_gemv_bench.py 2>&1 | grep -v -i warn > $OUT/gemv.txt; tail -25 $OUT/gemv.txt
timeout 150 python3 benchmarks/gpu_profile.py $CFG 2>&1 | grep -v -i warn > $OUT/profile_bf16.txt; tail -32 $OUT/profile_bf16.txt
timeout 150 python3 benchmarks/gpu_profile.py $CFG --quantize int4 2>&1 | grep -v -i warn > $OUT/profile_int4.txt; tail -32 $OUT/profile_int4.txt
