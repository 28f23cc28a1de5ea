#!/usr/bin/env bash
# Device call 36 (issue 7, seventh session): with dp4a now the default, what rounding x costs in a
# small model's output against float32 (benchmarks/dp4a_quality.py), and 8-layer decode with no
# environment set (the product's default).
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 benchmarks/dp4a_quality.py 2>&1 | grep -v -i warn | tail -9
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --layers 8"
for q in int4 int8; do timeout 75 $B --quantize $q > $OUT/l8_$q.json 2> $OUT/l8_$q.err; python3 -c "
import json,statistics
for r in json.load(open('$OUT/l8_$q.json')): print('8 layers $q default', r['test'], round(statistics.median(r['tokens_per_s']),1))" || tail -2 $OUT/l8_$q.err; done
