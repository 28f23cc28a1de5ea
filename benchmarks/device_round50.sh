#!/usr/bin/env bash
# Device call 50 (issue 7, branch wip/prefill-graphs, for the next session): the prompt's forward
# replayed as a CUDA graph per padded length (generate.PrefillGraphs) against the eager prefill
# (ERNIE_PREFILL_GRAPH=0). Its GPU tests first, then the full bf16 model, graph and eager, and 8 layers with the graph (the
# earlier sessions' 8-layer eager pp512 was 33,551-52,828, host-bound), in one call.
# Limits allow for a fresh machine's cold Triton and Inductor caches (round 49 lost its runs to 80 s).
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 120 python3 -m pytest -q -rf --tb=short tests/test_prefill_graphs.py 2>&1 | tail -6
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128 -r 5"
run full_bf16_graph 200 $B
run full_bf16_eager 140 env ERNIE_PREFILL_GRAPH=0 $B
run l8_bf16_graph 55 $B --layers 8
echo "$(( $(date +%s) - START )) s"
