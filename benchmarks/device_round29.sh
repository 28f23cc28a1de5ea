#!/usr/bin/env bash
# Device call 29 (issue 7, for the next session): the full int4 model's decode alternating the word
# kernel and the byte loop (round 28 ran them in one order only). The second pair reuses the first
# pair's compile caches, so all four fit in one call.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int4"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], [round(t,1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
for f in words bytes words bytes; do run full_$f 170 env ERNIE_INT4_GEMV=$f $B; nvidia-smi --query-gpu=clocks.sm,temperature.gpu --format=csv,noheader; done
