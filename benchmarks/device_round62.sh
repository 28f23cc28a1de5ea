#!/usr/bin/env bash
# Device call 62 (issue 7, branch wip/decode-fewer-kernels, prepared in the eleventh session): the
# router's logits as one Inductor kernel (ERNIE_ROUTER_LOGITS=linear keeps F.linear), a token's
# expert outputs added one by one (ERNIE_EXPERT_SUM=reduce keeps the sum) and the router kernel on
# one warp (ERNIE_ROUTE_WARPS=4 keeps four). The compiled path's parity on the MoE shape (the one
# the changes touch), the router and quantized CUDA tests first; then bf16 with all three changes and
# with each one off, same call. Round 61's parity check needed more than 110 s on a cold machine.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 200 python3 benchmarks/cuda_parity.py moe 2>&1 | grep "^|\|PARITY\|Error" | tail -12
timeout 120 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_quant_cuda.py tests/test_gpu_gemv.py -k "router or quant" 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run bf16_all 150 $B
run bf16_router_linear 100 env ERNIE_ROUTER_LOGITS=linear $B
run bf16_expert_reduce 100 env ERNIE_EXPERT_SUM=reduce $B
run bf16_route_warps4 90 env ERNIE_ROUTE_WARPS=4 $B
echo "$(( $(date +%s) - START )) s"
