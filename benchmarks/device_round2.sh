#!/usr/bin/env bash
# Device call 2: compiled decode (issue 7) checked against eager, then timed beside transformers.
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json"
timeout 200 python3 benchmarks/cuda_parity.py 2>&1 | grep -v -e Loading -e Writing | tail -16
( time $B -p 512 -n 128 --compile on > $OUT/c.json ) 2> $OUT/c.err; tail -4 $OUT/c.err
timeout 150 $B -p 0 -n 128 -d 8192 --compile on > $OUT/c_depth.json 2>> $OUT/c.err
timeout 120 $B --layers 8 -p 512 -n 128 --compile on > $OUT/c_8l.json 2>> $OUT/c.err
timeout 60 $B -p 512 -n 32 -r 3 --compile off > $OUT/e.json 2>> $OUT/c.err
timeout 150 python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err
tail -3 $OUT/c.err
python3 benchmarks/summarize.py $OUT/c.json $OUT/c_depth.json $OUT/c_8l.json $OUT/e.json $OUT/hf_grouped.json
