#!/usr/bin/env bash
# Device call 5 (issue 7): the Triton one-token GEMVs. Correctness first (kernel tests, quantized
# CUDA vs CPU, CUDA parity of the tiny shapes with greedy and compiled-vs-eager), then the kernel table.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 120 python3 -m pytest -q -x tests/test_gpu_gemv.py 2>&1 | tail -4
timeout 100 python3 -m pytest -q -x tests/test_quant_cuda.py 2>&1 | tail -4
timeout 120 python3 benchmarks/gpu_gemv_bench.py 2>&1 | grep -v -i warn | tail -20
timeout 150 python3 benchmarks/cuda_parity.py 2>&1 | tail -12
