#!/usr/bin/env bash
# Device call 23 (issue 7, fifth session): the final int4 kernel (round 21's arithmetic without the
# removed branch) against float64, and the quantized CUDA model against the CPU kernels.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline -1 2>/dev/null
timeout 200 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | tail -4
