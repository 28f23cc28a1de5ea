#!/usr/bin/env bash
# Device call 65 (issue 7, branch wip/decode-fewer-kernels, once rounds 62-64 decide what stays): the
# issue's table in one call, as round 52 had it: ernie full bf16 (pp512; tg128 at depths 0 and 8,192),
# int8 and int4, and transformers' grouped_mm decode and prefill on the same random full-size shape.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128"
run table_bf16 200 $B -r 5 -d 0,8192
run table_int8 110 $B -r 5 --quantize int8
run table_int4 110 $B -r 5 --quantize int4
s=$(date +%s); timeout 120 python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err
echo "hf ($(( $(date +%s) - s )) s)"; cut -c 1-300 $OUT/hf_grouped.json; grep -v -i warn $OUT/hf.err | tail -2
echo "$(( $(date +%s) - START )) s"
