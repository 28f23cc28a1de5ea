#!/usr/bin/env bash
# Device call 62 (issue 7, branch wip/decode-fewer-kernels, prepared in the eleventh session): six
# changes that each take launches or barriers out of the decode step, each with a switch back:
#   ERNIE_ROUTER_LOGITS=linear       the router's logits by F.linear (two cuBLAS kernels), not one Inductor kernel
#   ERNIE_EXPERT_SUM=reduce          a token's expert outputs summed by a kernel of their own, not folded into the next norm
#   ERNIE_ROUTE_WARPS=4              the router kernel on four warps (59 barriers), not one
#   ERNIE_ATTENTION_COMBINE=kernel   the attention's stretches weighed by a second kernel, not by the last program
#   ERNIE_GEMV_IDX_LOOKS_WRITTEN=1   Inductor copies the expert ids before every GEMV launch, as before
#   ERNIE_ROPE_ROWS=graph            the RoPE rows taken in the graph (copied once a layer), not by the attention kernel
# Correctness first: the compiled path's parity on the MoE shape; the GPU tests of the attention,
# router and GEMV kernels (the last-program combine's memory ordering can only be shown here). Then
# bf16 with all six changes and with the first two off; round 63 has the other four.
# Round 61's parity check needed more than 110 s on a cold machine.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 140 python3 benchmarks/cuda_parity.py moe 2>&1 | grep "^|\|PARITY\|Error" | tail -12
timeout 200 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_gpu_attention.py tests/test_gpu_attention_writes.py \
  tests/test_gpu_gemv.py 2>&1 | tail -4
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run bf16_all 110 $B
run bf16_router_linear 70 env ERNIE_ROUTER_LOGITS=linear $B
run bf16_expert_reduce 70 env ERNIE_EXPERT_SUM=reduce $B
echo "$(( $(date +%s) - START )) s"
