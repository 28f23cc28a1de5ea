#!/usr/bin/env bash
# Device call 12 (issue 7): why pp512 fell after round 10 (8 layers: 52,828 -> 34,544 tok/s).
# Three processes, prefill only: as shipped; ERNIE_TRITON=0 (router tail and one-token linears in
# torch again); --compile off (q/k/v not fused).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -r 7 -p 512 -n 0 -o json"
for v in "shipped:--compile on" "triton_off:--compile on" "unfused:--compile off"; do
  name=${v%%:*}; opt=${v#*:}
  if [ $name = triton_off ]; then export ERNIE_TRITON=0; else unset ERNIE_TRITON; fi
  timeout 45 $B $opt > $OUT/$name.json 2>/dev/null
  python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print('$name', r['test'], round(statistics.median(r['tokens_per_s'])), [round(x) for x in r['tokens_per_s']])" || echo "$name failed"
done
