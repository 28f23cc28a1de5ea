#!/usr/bin/env bash
# Device call 64 (issue 7, branch wip/decode-fewer-kernels): round 63 lost its benches to a bare
# `wait`, which also waited for the log's tee. The last GEMV test (torch.compile sees only the output
# written), then bf16 and int4 with all six changes and with all six off, same call.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_gpu_gemv.py -k "torch_compile or written" 2>&1 | tail -2
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
OFF="env ERNIE_ROUTER_LOGITS=linear ERNIE_EXPERT_SUM=reduce ERNIE_ROUTE_WARPS=4 ERNIE_ATTENTION_COMBINE=kernel ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 ERNIE_ROPE_ROWS=graph"
run bf16_all 110 $B
run bf16_off 100 $OFF $B
run int4_all 100 $B --quantize int4
run int4_off 100 $OFF $B --quantize int4
echo "$(( $(date +%s) - START )) s"
