#!/usr/bin/env bash
# Device call 3: int8 / int4 decode with the compiled step (issue 7), bf16 rerun as the same-call baseline.
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -r 5 -o json --compile on"
timeout 100 $B -p 512 -n 128 > $OUT/bf16.json 2> $OUT/err.txt
timeout 150 $B -p 512 -n 128 --quantize int8 > $OUT/int8.json 2>> $OUT/err.txt
timeout 150 $B -p 512 -n 128 --quantize int4 > $OUT/int4.json 2>> $OUT/err.txt
timeout 100 $B -p 512 -n 128 --quantize int4 --layers 8 > $OUT/int4_8l.json 2>> $OUT/err.txt
timeout 60 $B -p 512 -n 128 --layers 8 > $OUT/bf16_8l.json 2>> $OUT/err.txt
timeout 120 python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err
grep -v Warning $OUT/err.txt | grep -i -B2 -A2 error | tail -20
python3 benchmarks/summarize.py $OUT/bf16.json $OUT/int8.json $OUT/int4.json $OUT/bf16_8l.json $OUT/int4_8l.json $OUT/hf_grouped.json
