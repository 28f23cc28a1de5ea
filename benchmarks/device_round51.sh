#!/usr/bin/env bash
# Device call 51 (issue 7, branch wip/prefill-graphs): the ninth session's prefill (eager, torch's
# grouped GEMM) in bf16 for the baseline of round 50, then int4 and int8 (the experts expanded to
# bf16 by gpu_dequant, then the same products) with both changes on and, for int4, both off.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128 -r 5"
run full_bf16_eager_torch 170 env ERNIE_PREFILL_GRAPH=0 ERNIE_GROUPED_GEMM=torch $B
run full_int4_graph_triton 150 $B --quantize int4
run full_int4_eager_torch 120 env ERNIE_PREFILL_GRAPH=0 ERNIE_GROUPED_GEMM=torch $B --quantize int4
run full_int8_graph_triton 130 $B --quantize int8
echo "$(( $(date +%s) - START )) s"
