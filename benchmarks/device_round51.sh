#!/usr/bin/env bash
# Device call 51 (issue 7, branch wip/prefill-graphs): the prefill graphs with int4 and int8 weights
# (the experts expanded to bf16 in gpu_dequant's scratch inside the graph), against the eager prefill.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128 -r 5"
run full_int4_graph 170 $B --quantize int4
run full_int4_eager 130 env ERNIE_PREFILL_GRAPH=0 $B --quantize int4
run full_int8_graph 140 $B --quantize int8
run full_int8_eager 130 env ERNIE_PREFILL_GRAPH=0 $B --quantize int8
echo "$(( $(date +%s) - START )) s"
