#!/usr/bin/env bash
# Device call 43 (issue 7): the full model in bf16 with the Triton decode attention against the masked
# SDPA, in one call (run as one command line; recorded here).
source benchmarks/device_env.sh >/dev/null 2>&1; B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 3"; for a in triton sdpa; do s=$(date +%s); ERNIE_DECODE_ATTENTION=$a timeout 115 $B > $OUT/bf16_$a.json 2>/dev/null; echo -n "full_bf16_$a ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/bf16_$a.json')): print(r['test'], [round(t,1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']),1))" 2>/dev/null || echo failed; done
