#!/usr/bin/env bash
# Device call 48 (issue 7, branch wip/shared-in-experts): the full model in int8 (shared experts in the
# stack, weighted down off, against both off) and in bf16 at depths 0 and 8,192 (shared in the stack
# against the separate MLP; the first depth figure with the Triton decode attention), in one call.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128"
run full_int8_shared_w0 140 env ERNIE_SHARED_IN_EXPERTS=1 ERNIE_WEIGHTED_DOWN=0 $B -r 5 --quantize int8
run full_int8_off 130 env ERNIE_SHARED_IN_EXPERTS=0 ERNIE_WEIGHTED_DOWN=0 $B -r 5 --quantize int8
run full_bf16_shared 160 env ERNIE_SHARED_IN_EXPERTS=1 $B -r 3 -d 0,8192
run full_bf16_off 150 env ERNIE_SHARED_IN_EXPERTS=0 $B -r 3 -d 0,8192
