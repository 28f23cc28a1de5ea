#!/usr/bin/env bash
# Device call 22 (issue 7, fifth session): does the contiguous-x int4 GEMV want other block shapes?
# The kernel table with the shipped shapes and with six more (int4+), the chosen shape of every row.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 benchmarks/gpu_gemv_bench.py int4 int4+ 2>&1 | grep -v -i warn | tail -34
