#!/usr/bin/env bash
# Device call 57 (issue 7, branch wip/attention-writes-cache, after round 56): int8's pair with the
# attention change on and off; bf16 with the experts' SwiGLU formed by torch (ERNIE_SWIGLU_IN_DOWN=0)
# against both changes on (after gpu_gemv's own tests); then the int4 decode step's profile (what a layer still launches).
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run int8_on 150 $B --quantize int8
run int8_off 90 env ERNIE_ATTENTION_WRITES_CACHE=0 $B --quantize int8
run bf16_on 120 $B
run bf16_swiglu_torch 90 env ERNIE_SWIGLU_IN_DOWN=0 $B
timeout 200 python3 benchmarks/gpu_profile.py $CFG --quantize int4 --top 30 2>&1 | grep -v -i warn | tail -45
echo "$(( $(date +%s) - START )) s"
