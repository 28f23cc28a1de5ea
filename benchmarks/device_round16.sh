#!/usr/bin/env bash
# Device call 16 (issue 7, fourth session): the reshaped int4 dequantize kernel (tests, then the full
# int4 prefill A/B with its kernel profile), and `ernie complete` start-up on the full shape, cold and
# warm, from a hollow checkpoint (benchmarks/gpu_ttft.py; the tokenizer travels in .device_carry).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -rf --tb=short tests/test_gpu_elementwise.py 2>&1 | tail -3
timeout 90 python3 benchmarks/gpu_prefill_ab.py $CFG --quantize int4 -r 3 2>&1 | grep -v -i warn | tail -30
timeout 300 python3 benchmarks/gpu_ttft.py $CFG .device_carry/tokenizer /tmp/ttft --runs 3 2>&1 | grep -v -i warn | tail -12
