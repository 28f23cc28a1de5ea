#!/usr/bin/env bash
# Device call 40 (issue 7, branch wip/next-session = the three candidate branches merged, for the next
# session): every GPU test, then each candidate switched off in turn on 8 layers, alternating with all on.
#   ERNIE_DECODE_ATTENTION=sdpa   the masked SDPA (wip/decode-attention off)
#   ERNIE_SWIGLU_IN_DOWN=0        silu(gate)*up by torch ops (wip/swiglu-in-down off)
#   ERNIE_INT8_DP4A=all           dp4a for every int8 product (wip/int8-dp4a-selective off)
# benchmarks/device_round41.sh then runs the full model.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --layers 8"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -3); rm -f $OUT/$name.err; }
run l8_bf16_all_on 60 $B
run l8_bf16_sdpa 60 env ERNIE_DECODE_ATTENTION=sdpa $B
run l8_int4_all_on 60 $B --quantize int4
run l8_int4_sdpa 60 env ERNIE_DECODE_ATTENTION=sdpa $B --quantize int4
run l8_int4_no_swiglu 60 env ERNIE_SWIGLU_IN_DOWN=0 $B --quantize int4
run l8_int8_all_on 60 $B --quantize int8
run l8_int8_dp4a_all 60 env ERNIE_INT8_DP4A=all $B --quantize int8
# The tests last, with whatever is left of the call's 600 s, so a slow test cannot starve the A/B.
timeout $(( 585 - ($(date +%s) - START) )) python3 -m pytest -q -x -rf --tb=short tests/test_gpu_attention.py tests/test_quant_cuda.py tests/test_gpu_gemv.py -k "attention or quant_cuda or silu or dp4a" 2>&1 | tail -5
