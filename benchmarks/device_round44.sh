#!/usr/bin/env bash
# Device call 44 (issue 7, branch wip/shared-in-experts, for the next session): the shared experts as
# two more experts of the routed stack in the CUDA decode graph (MoE.fuse_shared_experts), and the
# int8/int4 down product weighing and adding the experts (ERNIE_WEIGHTED_DOWN).
# Compiled (fused) against eager (separate MLP) in cuda_parity.py, then 8-layer A/B, each switch off
# in turn against all on, then the CUDA tests in what is left of the call's 600 s.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 benchmarks/cuda_parity.py > $OUT/parity.txt 2>&1; grep "^|\|PARITY" $OUT/parity.txt || tail -8 $OUT/parity.txt
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --layers 8"
run() { name=$1; shift; s=$(date +%s); timeout $1 "${@:2}" > $OUT/$name.json 2> $OUT/$name.err; echo -n "$name ($(( $(date +%s) - s )) s): "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$name.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), 'peak GiB', round(r['peak_memory_bytes']/2**30,2), end='  ')
print()" 2>/dev/null || (echo failed; grep -v -i warn $OUT/$name.err | tail -8); rm -f $OUT/$name.err $OUT/$name.json; }
for q in int4 int8; do
  run l8_${q}_all_on 60 $B --quantize $q
  run l8_${q}_shared0 60 env ERNIE_SHARED_IN_EXPERTS=0 $B --quantize $q
  run l8_${q}_weighted0 60 env ERNIE_WEIGHTED_DOWN=0 $B --quantize $q
done
run l8_bf16_all_on 60 $B
run l8_bf16_shared0 60 env ERNIE_SHARED_IN_EXPERTS=0 $B
timeout $(( 585 - ($(date +%s) - START) )) python3 -m pytest -q -x -rf --tb=short tests/test_gpu_attention.py tests/test_quant_cuda.py tests/test_gpu_gemv.py -k "compiled or quant_cuda or silu or router or weighs" 2>&1 | tail -5
