#!/usr/bin/env bash
# Device call 7 (issue 7): start-up cost of the compiled decode, cold (empty Inductor and Triton
# caches) and warm (the caches the cold run left), as the wall time of a short ernie bench process
# (random weights made on the GPU: no disk reading); then the full-size int4 decode.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
S="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 1 -p 16 -n 8 -o json --compile on"
export TORCHINDUCTOR_CACHE_DIR=/tmp/cold/inductor TRITON_CACHE_DIR=/tmp/cold/triton
for run in cold warm; do
  s=$(date +%s.%N); timeout 150 $S > $OUT/start_$run.json 2> $OUT/start_$run.err; e=$(date +%s.%N)
  echo "$run start-to-finish: $(python3 -c "print(round($e - $s, 1))") s"
done
python3 -c "
import json
for run in ('cold', 'warm'):
    for r in json.load(open('$OUT/start_' + run + '.json')): print(run, r['test'], 'ttft ms', [round(t*1000,1) for t in r['ttft_s']])" 2>&1 | tail -4
timeout 300 python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json --compile on -p 0 -n 128 --quantize int4 > $OUT/int4_full.json 2> $OUT/int4_full.err
python3 -c "
import json,statistics
for r in json.load(open('$OUT/int4_full.json')): print('int4 full', r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0))" || grep -v -i warn $OUT/int4_full.err | tail -3
