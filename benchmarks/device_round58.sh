#!/usr/bin/env bash
# Device call 58 (issue 7, branch wip/attention-writes-cache, after round 56): round 56's int4 "off"
# run hit its 90 s limit on cold caches, and its "on" run read 502 tok/s against 572 for main last
# session, so int4's pair is run again here with longer limits, "off" first; then int8's pair and
# gpu_gemv's own tests (the bf16 SwiGLU change edits that kernel).
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 120 python3 -m pytest -q -rf --tb=short tests/test_gpu_gemv.py 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run int4_off 150 env ERNIE_ATTENTION_WRITES_CACHE=0 $B --quantize int4
run int4_on 130 $B --quantize int4
run int8_on 130 $B --quantize int8
run int8_off 110 env ERNIE_ATTENTION_WRITES_CACHE=0 $B --quantize int8
echo "$(( $(date +%s) - START )) s"
