#!/usr/bin/env bash
# Device call 15 (issue 7, fourth session): the table in one call on one card: ernie full bf16
# (pp512, tg128 at depth 0 and 8192: two compiles, the cache grows), full int4, and transformers'
# grouped_mm. Round 14's benches ran past their timeouts (the full compile takes about a minute).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), round(r['peak_memory_bytes']/2**30,2), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run bf16_full 220 $B -r 5 -p 512 -n 128 -d 0,8192
run int4_full 170 $B -r 5 -p 512 -n 128 --quantize int4
s=$(date +%s); timeout 110 python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err; echo "hf ($(( $(date +%s) - s )) s)"; cut -c 1-200 $OUT/hf_grouped.json; grep -v -i warn $OUT/hf.err | tail -2
