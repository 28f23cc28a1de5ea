#!/usr/bin/env bash
# Device call 37 (issue 7, branch wip/decode-attention, for the next session): decode attention as two
# Triton kernels (gpu_attention) instead of the masked SDPA over the whole cache. Tests, compiled
# against eager, then 8-layer decode alternating ERNIE_DECODE_ATTENTION=sdpa / triton, bf16 and int4,
# and at depth 8192.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -rf --tb=short tests/test_gpu_attention.py 2>&1 | tail -5
timeout 150 python3 benchmarks/cuda_parity.py > $OUT/parity.txt 2>&1; grep "^|" $OUT/parity.txt || tail -5 $OUT/parity.txt
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --layers 8"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], r['depth'], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); rm -f $OUT/$name.err; }
for a in sdpa triton; do run l8_bf16_$a 70 env ERNIE_DECODE_ATTENTION=$a $B -d 0,8192; done
for a in sdpa triton; do run l8_int4_$a 70 env ERNIE_DECODE_ATTENTION=$a $B --quantize int4; done
for a in triton sdpa; do run l8_bf16_${a}_2 70 env ERNIE_DECODE_ATTENTION=$a $B; done
