#!/usr/bin/env bash
# Device call 63 (issue 7, branch wip/decode-fewer-kernels, after round 62): round 62 found every
# compiled bench failing in CUDA-graph trees' memory-pool check: the attention's ticket counters were
# allocated lazily inside the graph's warm-up, in its private pool, and kept. setup_cache now
# allocates them first. The attention and GEMV GPU tests again, the three files side by side (round
# 62's 200 s cut them in one process, compiling); then bf16 with all six changes, with all six off,
# and with changes 1 and 5 off, same call.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
for f in test_gpu_attention test_gpu_attention_writes test_gpu_gemv; do
  timeout 230 python3 -m pytest -q -rf --tb=short -p no:warnings tests/$f.py > $OUT/$f.txt 2>&1 &
done
wait; for f in test_gpu_attention test_gpu_attention_writes test_gpu_gemv; do echo "$f: $(tail -1 $OUT/$f.txt)"; done
echo "tests done at $(( $(date +%s) - START )) s"
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
OFF="env ERNIE_ROUTER_LOGITS=linear ERNIE_EXPERT_SUM=reduce ERNIE_ROUTE_WARPS=4 ERNIE_ATTENTION_COMBINE=kernel ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 ERNIE_ROPE_ROWS=graph"
run bf16_all 110 $B
run bf16_off 100 $OFF $B
run bf16_router_linear 70 env ERNIE_ROUTER_LOGITS=linear $B
run bf16_idx_copied 70 env ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 $B
echo "$(( $(date +%s) - START )) s"
