#!/usr/bin/env bash
# Device call 20 (issue 7, fifth session): how the int4 GEMV reads x (gpu_gemv.INT4_FORM: 0 as shipped,
# even and odd entries as two stride-2 loads; 4 one contiguous load split in registers; 5 the codes
# interleaved back into column order against contiguous x; 6 x split into [even | odd] before the
# launch), kernel table and 8-layer int4 decode with each.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 benchmarks/gpu_gemv_bench.py int4:0 int4:4 int4:5 int4:6 2>&1 | grep -v -i warn | tail -30
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --quantize int4"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); }
for f in 0 4 5 6; do run int4_form$f 75 env ERNIE_INT4_FORM=$f $B; done
