#!/usr/bin/env bash
# Device call 64 (issue 7, branch wip/decode-fewer-kernels, after rounds 62-63): the quantized CUDA
# tests; int4 and int8 decode with the six changes and with all six off, same call; then the int4
# step's kernel profile, to see what the graph still launches.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_quant_cuda.py 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
OFF="env ERNIE_ROUTER_LOGITS=linear ERNIE_EXPERT_SUM=reduce ERNIE_ROUTE_WARPS=4 ERNIE_ATTENTION_COMBINE=kernel ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 ERNIE_ROPE_ROWS=graph"
run int4_all 150 $B --quantize int4
run int4_off 110 $OFF $B --quantize int4
run int8_all 130 $B --quantize int8
run int8_off 110 $OFF $B --quantize int8
timeout 120 python3 benchmarks/gpu_profile.py $CFG --quantize int4 --top 30 2>&1 | grep -v -i warn > $OUT/profile_int4.txt
tail -12 $OUT/profile_int4.txt
echo "$(( $(date +%s) - START )) s"
