#!/usr/bin/env bash
# Device call 70 (issue 7): the last row on the code of rounds 68-69, llama.cpp's comparison
# shape (the real layers cut to 8: layer 0 dense, 1-7 MoE): bf16 prefill and decode, int4 decode.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit --format=csv,noheader
within() { local left=$(( 590 - ($(date +%s) - START) )); (( $1 < left )) && echo $1 || echo $left; }
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -o json --compile on -n 128 -r 5"
run l8_bf16 $(within 150) $B -p 512
run l8_int4 $(within 150) $B -p 0 --quantize int4
echo "$(( $(date +%s) - START )) s"
