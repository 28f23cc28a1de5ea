#!/usr/bin/env bash
# Device call 66 (issue 7, after the twelfth session's rounds 62-64): what those did not reach.
# First the GPU tests never run on the six changes: the router kernel on one warp, the compile
# analysis (now under torch 2.11's name), the quantized model's CUDA-against-CPU test; side by side,
# each waited for by its process id (round 63's bare `wait` also waited for the log's tee).
# Then bf16 with all six changes on and with the first three each switched back alone (round 67 has
# the other three), same call. Warm runs took 29-42 s, a changed switch 80-100 s (rounds 56-61).
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
pids=()
timeout 170 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_gpu_gemv.py -k "router or written" > $OUT/gemv.txt 2>&1 & pids+=($!)
timeout 170 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_quant_cuda.py > $OUT/quant.txt 2>&1 & pids+=($!)
wait "${pids[@]}"; for f in gemv quant; do echo "$f: $(tail -1 $OUT/$f.txt)"; grep FAILED $OUT/$f.txt | head -5; done
echo "tests done at $(( $(date +%s) - START )) s"
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
# within LIMIT: a run's own limit, cut to what is left of the call's 600 s
within() { local left=$(( 590 - ($(date +%s) - START) )); (( $1 < left )) && echo $1 || echo $left; }
run bf16_all $(within 130) $B
run bf16_router_linear $(within 110) env ERNIE_ROUTER_LOGITS=linear $B
run bf16_expert_reduce $(within 110) env ERNIE_EXPERT_SUM=reduce $B
run bf16_route_warps4 $(within 110) env ERNIE_ROUTE_WARPS=4 $B
echo "$(( $(date +%s) - START )) s"
