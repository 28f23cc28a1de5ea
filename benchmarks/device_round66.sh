#!/usr/bin/env bash
# Device call 66 (issue 7, after the twelfth session's rounds 62-64): what those did not reach.
# The GPU tests never run on the six changes: the router kernel on one warp, the compile analysis
# (now under torch 2.11's name), the quantized model's CUDA-against-CPU test; side by side, each
# waited for by its process id (round 63's bare `wait` also waited for the log's tee). Then int4
# with all six changes and with none, same call. Cold compile caches need about 110 s a run.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
pids=()
timeout 150 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_gpu_gemv.py -k "router or written" > $OUT/gemv.txt 2>&1 & pids+=($!)
timeout 170 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_quant_cuda.py > $OUT/quant.txt 2>&1 & pids+=($!)
wait "${pids[@]}"; for f in gemv quant; do echo "$f: $(tail -1 $OUT/$f.txt)"; grep FAILED $OUT/$f.txt | head -5; done
echo "tests done at $(( $(date +%s) - START )) s"
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
OFF="env ERNIE_ROUTER_LOGITS=linear ERNIE_EXPERT_SUM=reduce ERNIE_ROUTE_WARPS=4 ERNIE_ATTENTION_COMBINE=kernel ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 ERNIE_ROPE_ROWS=graph"
run int4_all 140 $B --quantize int4
run int4_off 130 $OFF $B --quantize int4
echo "$(( $(date +%s) - START )) s"
