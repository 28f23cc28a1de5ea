#!/usr/bin/env bash
# Issue 8's 8-layer comparison shape (layer 0 dense, 1-7 MoE) on the CPU: ernie int4, int8 and bf16,
# transformers bf16, one after another.
set -u
OUT=$1; mkdir -p "$OUT"
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
ernie bench --config $CFG --layers 8 --quantize int4 -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/int4_8l.json" 2> "$OUT/err.txt"
ernie bench --config $CFG --layers 8 --quantize int8 -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/int8_8l.json" 2>> "$OUT/err.txt"
ernie bench --config $CFG --layers 8 --dtype bfloat16 -t 2 -p 0 -n 64 -r 3 -o json > "$OUT/bf16_8l.json" 2>> "$OUT/err.txt"
python benchmarks/hf_baseline.py $CFG --layers 8 --device cpu --experts grouped_mm -p 64 -n 32 -r 3 > "$OUT/hf_8l.json" 2>> "$OUT/err.txt"
echo done >> "$OUT/err.txt"
