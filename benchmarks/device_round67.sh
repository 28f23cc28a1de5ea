#!/usr/bin/env bash
# Device call 67 (issue 7): the other three of the six decode-step changes each switched back alone,
# bf16, against all six on in the same call (round 66 has the first three). Round 64 measured only
# all six against none (+8.0%). A change whose switch costs nothing is a candidate for removal.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
within() { local left=$(( 590 - ($(date +%s) - START) )); (( $1 < left )) && echo $1 || echo $left; }
run bf16_all $(within 130) $B
run bf16_combine_kernel $(within 110) env ERNIE_ATTENTION_COMBINE=kernel $B
run bf16_idx_copied $(within 110) env ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 $B
run bf16_rope_rows_graph $(within 110) env ERNIE_ROPE_ROWS=graph $B
echo "$(( $(date +%s) - START )) s"
