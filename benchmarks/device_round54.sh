#!/usr/bin/env bash
# Device call 54 (issue 7, tenth session): `ernie complete` start-up on the full shape with the prompt's
# forward as a CUDA graph (its capture now falls in the first token), cold and warm, from a hollow
# checkpoint (benchmarks/gpu_ttft.py, as round 16; the tokenizer travels in .device_carry).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python3 benchmarks/gpu_ttft.py $CFG .device_carry/tokenizer /tmp/ttft --runs 3 2>&1 | grep -v -i warn | tail -12
