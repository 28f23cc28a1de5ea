#!/usr/bin/env bash
# Device call 27 (issue 7, sixth session): where a compiled int4 decode step goes, full model and 8
# layers, with the word kernel: round 26's full model did not speed up while 8 layers gained 23%.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 benchmarks/gpu_profile.py $CFG --layers 8 --quantize int4 --top 14 2>&1 | grep -v -i warn | tail -32
timeout 330 python3 benchmarks/gpu_profile.py $CFG --quantize int4 --top 14 2>&1 | grep -v -i warn | tail -32
