#!/usr/bin/env bash
# Device call 69 (issue 7): the table continued (round 68 has bf16 and transformers), int8
# and int4 with the decode-step changes kept; then the one change round 67 could not time (its run
# was cut while compiling): the expert ids copied before each GEMV again, against all on.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit --format=csv,noheader
within() { local left=$(( 590 - ($(date +%s) - START) )); (( $1 < left )) && echo $1 || echo $left; }
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on"
run table_int8 $(within 130) $B -p 512 -n 128 -r 5 --quantize int8
run table_int4 $(within 150) $B -p 512 -n 128 -r 5 --quantize int4
run bf16_all $(within 130) $B -p 0 -n 128 -r 5
run bf16_idx_copied $(within 150) env ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 $B -p 0 -n 128 -r 5
echo "$(( $(date +%s) - START )) s"
