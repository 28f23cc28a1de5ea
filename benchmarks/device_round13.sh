#!/usr/bin/env bash
# Device call 13 (issue 7, fourth session): eager prefill without the per-layer host sync and with
# Triton RMSNorm/RoPE (A/B in one process, full and 8 layers), quantized prefill through the Triton
# dequantize kernel and grouped GEMMs, the new kernels' tests and the parity checks, and where a
# full int4 decode step goes.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python3 benchmarks/gpu_prefill_ab.py $CFG -r 7 2>&1 | grep -v -i warn | tail -16
timeout 50 python3 benchmarks/gpu_prefill_ab.py $CFG --layers 8 -r 7 2>&1 | grep -v -i warn | tail -16
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_gpu_elementwise.py tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | grep -v "^\s*$" | tail -15
timeout 140 python3 benchmarks/cuda_parity.py > $OUT/parity.txt 2>&1; grep "^|" $OUT/parity.txt || tail -5 $OUT/parity.txt
timeout 100 python3 benchmarks/gpu_prefill_ab.py $CFG --quantize int8 -r 3 2>&1 | grep -v -i warn | tail -14
