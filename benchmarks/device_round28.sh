#!/usr/bin/env bash
# Device call 28 (issue 7, sixth session): the full int4 model's decode with the word kernel and with
# the byte loop (ERNIE_INT4_GEMV=bytes), in one call, since round 26's full-model figure did not move.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int4"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], [round(t,1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), round(r['peak_memory_bytes']/2**30,2), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
run full_bytes 175 env ERNIE_INT4_GEMV=bytes $B
run full_words 175 env ERNIE_INT4_GEMV=words $B
