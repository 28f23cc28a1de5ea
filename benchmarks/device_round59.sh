#!/usr/bin/env bash
# Device call 59 (issue 7, branch wip/attention-writes-cache): round 58's gpu_gemv tests hit their
# 120 s limit while compiling; here with a longer one, then bf16 with the experts' SwiGLU formed by
# torch (ERNIE_SWIGLU_IN_DOWN=0) against the branch's default, on the same machine.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run bf16_swiglu_torch 110 env ERNIE_SWIGLU_IN_DOWN=0 $B
run bf16_on 110 $B
timeout 280 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_gpu_gemv.py 2>&1 | tail -4
echo "$(( $(date +%s) - START )) s"
