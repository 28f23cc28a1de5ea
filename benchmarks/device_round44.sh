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
# run() is in device_env.sh; the JSONs are dropped here, since only 8 files come back.
run8() { run "$@"; rm -f "$OUT/$1.json"; }
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5 --layers 8"
for q in int4 int8; do
  run8 l8_${q}_all_on 60 $B --quantize $q
  run8 l8_${q}_shared0 60 env ERNIE_SHARED_IN_EXPERTS=0 $B --quantize $q
  run8 l8_${q}_weighted0 60 env ERNIE_WEIGHTED_DOWN=0 $B --quantize $q
done
run8 l8_bf16_all_on 60 $B
run8 l8_bf16_shared0 60 env ERNIE_SHARED_IN_EXPERTS=0 $B
timeout $(( 585 - ($(date +%s) - START) )) python3 -m pytest -q -x -rf --tb=short tests/test_gpu_attention.py tests/test_quant_cuda.py tests/test_gpu_gemv.py -k "compiled or quant_cuda or silu or router or weighs" 2>&1 | tail -5
