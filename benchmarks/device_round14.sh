#!/usr/bin/env bash
# Device call 14 (issue 7, fourth session): the prefill A/B after the MoE tail change (index_copy +
# one batched product instead of index_add_), then the table in one call on one card: full
# bf16 (pp512, tg128 at depth 0 and 8192), full int4 and int8, and transformers' grouped_mm.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 benchmarks/gpu_prefill_ab.py $CFG -r 7 2>&1 | grep -v -i warn | tail -34
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json --compile on"
run() { name=$1; shift; timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name: "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run bf16_full 130 $B -p 512 -n 128 -d 0,8192
run int4_full 110 $B -p 512 -n 128 --quantize int4
run int8_full 110 $B -p 512 -n 128 --quantize int8
timeout 150 python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err; tail -c 600 $OUT/hf_grouped.json; grep -v -i warn $OUT/hf.err | tail -2
