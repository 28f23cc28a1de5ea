#!/usr/bin/env bash
# Device call 50 (issue 7, branch wip/prefill-graphs, for the next session): the prompt's forward
# replayed as a CUDA graph per padded length (generate.PrefillGraphs) and the expert products of
# prefill as Triton kernels (gpu_grouped). Their GPU tests first; then the full bf16 model with both
# (the default), with torch's grouped GEMM inside the graph (ERNIE_GROUPED_GEMM=torch), and 8 layers
# (earlier sessions' 8-layer eager pp512 was 33,551-52,828, host-bound), in one call. Limits allow
# for a fresh machine's cold Triton and Inductor caches (round 49 lost its runs to 80 s limits).
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_prefill_graphs.py tests/test_gpu_grouped.py 2>&1 | tail -6
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128 -r 5"
run full_bf16_graph_triton 200 $B
run full_bf16_graph_torch 140 env ERNIE_GROUPED_GEMM=torch $B
run l8_bf16_graph_triton 55 $B --layers 8
echo "$(( $(date +%s) - START )) s"
