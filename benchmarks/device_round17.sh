#!/usr/bin/env bash
# Device call 17 (issue 7, fourth session): correctness after the MoE tail change (index_copy + one
# batched product) and the reshaped int4 dequantize kernel: parity against transformers, compiled
# against eager, and the quantized CUDA model against the CPU kernels.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 130 python3 benchmarks/cuda_parity.py > $OUT/parity.txt 2>&1; grep "^|" $OUT/parity.txt || tail -5 $OUT/parity.txt
timeout 90 python3 -m pytest -q -rf --tb=short tests/test_quant_cuda.py 2>&1 | tail -3
