#!/usr/bin/env bash
# Device call 67 (issue 7): each of the six decode-step changes alone, bf16, same call: all six on,
# then each switched back by itself. Round 64 measured only all six against none (+8.0%). A change
# whose switch costs nothing is a candidate for removal.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run bf16_all 110 $B
run bf16_router_linear 70 env ERNIE_ROUTER_LOGITS=linear $B
run bf16_expert_reduce 70 env ERNIE_EXPERT_SUM=reduce $B
run bf16_route_warps4 70 env ERNIE_ROUTE_WARPS=4 $B
run bf16_combine_kernel 70 env ERNIE_ATTENTION_COMBINE=kernel $B
run bf16_idx_copied 70 env ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 $B
run bf16_rope_rows_graph 70 env ERNIE_ROPE_ROWS=graph $B
echo "$(( $(date +%s) - START )) s"
