#!/usr/bin/env bash
# Device call 46 (issue 7, branch wip/shared-in-experts, for the next session): the full model in bf16,
# pp512 and tg128 at depths 0 and 8,192 (the first depth figure with the Triton decode attention),
# shared experts in the stack against the separate MLP, in one call.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128 -r 3 -d 0,8192"
run full_bf16_on 160 env ERNIE_SHARED_IN_EXPERTS=1 $B
run full_bf16_off 160 env ERNIE_SHARED_IN_EXPERTS=0 $B
