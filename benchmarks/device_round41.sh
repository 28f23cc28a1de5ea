#!/usr/bin/env bash
# Device call 41 (issue 7, branch wip/next-session, for the next session): the full model with every
# candidate on against main's behaviour (all three switched off), int4 and int8, in one call.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
OFF="ERNIE_DECODE_ATTENTION=sdpa ERNIE_SWIGLU_IN_DOWN=0 ERNIE_INT8_DP4A=all"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], [round(t,1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); rm -f $OUT/$name.err; }
run full_int4_on 200 $B --quantize int4
run full_int4_off 140 env $OFF $B --quantize int4
run full_int8_on 130 env ERNIE_INT8_DP4A=all $B --quantize int8  # round 42: selective int8 dp4a lost on 8 layers
run full_int8_off 130 env $OFF $B --quantize int8
