#!/usr/bin/env bash
# Device call 45 (issue 7, branch wip/shared-in-experts, for the next session): the full model with
# both changes on against both off (ERNIE_SHARED_IN_EXPERTS=0 ERNIE_WEIGHTED_DOWN=0), int4 and int8.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128 -r 5"
run full_int4_on 140 env ERNIE_SHARED_IN_EXPERTS=1 $B --quantize int4
run full_int4_off 140 env ERNIE_SHARED_IN_EXPERTS=0 ERNIE_WEIGHTED_DOWN=0 $B --quantize int4
run full_int8_on 140 env ERNIE_SHARED_IN_EXPERTS=1 $B --quantize int8
run full_int8_off 140 env ERNIE_SHARED_IN_EXPERTS=0 ERNIE_WEIGHTED_DOWN=0 $B --quantize int8
# The CUDA tests in what is left of the call's 600 s (round 44 runs them first, if it has time).
timeout $(( 585 - ($(date +%s) - START) )) python3 -m pytest -q -x -rf --tb=short tests/test_gpu_gemv.py tests/test_quant_cuda.py tests/test_gpu_attention.py -k "weighs or router or quant_cuda or compiled or silu" 2>&1 | tail -5
