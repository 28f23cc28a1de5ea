#!/usr/bin/env bash
# Device call 61 (issue 7, branch wip/router-logits-sum): the router's float32 logits in the compiled
# one-token step as a product and a sum (one Inductor kernel) instead of F.linear (cuBLAS's dot and
# reduce kernels, round 60). Parity of the compiled path on the MoE and dense shapes, then bf16
# decode with the change and with ERNIE_ROUTER_LOGITS=linear, same call. Short: the session's last
# ~350 device seconds.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
timeout 110 python3 benchmarks/cuda_parity.py moe dense 2>&1 | grep -v -i warn | tail -12
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run bf16_sum 100 $B
run bf16_linear 90 env ERNIE_ROUTER_LOGITS=linear $B
echo "$(( $(date +%s) - START )) s"
