#!/usr/bin/env bash
# Device call 56 (issue 7, branch wip/attention-writes-cache, prepared in the tenth session): RoPE and
# the KV cache write inside the decode attention kernel (gpu_attention.rotate_write_decode), which
# takes the graph's RoPE and cache-write kernels out of every layer. Its GPU tests, the CUDA parity
# check, then int4 and bf16 full models with the change on and off (ERNIE_ATTENTION_WRITES_CACHE=0),
# each pair in this call. Round 57 has int8's pair and the int4 profile. Limits allow for cold caches.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -rf --tb=short tests/test_gpu_attention_writes.py tests/test_gpu_gemv_swiglu.py tests/test_gpu_attention.py 2>&1 | tail -4
timeout 200 python3 benchmarks/cuda_parity.py 2>&1 | grep -v -i warn | tail -6
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run int4_on 150 $B --quantize int4
run int4_off 90 env ERNIE_ATTENTION_WRITES_CACHE=0 $B --quantize int4
run bf16_on 120 $B
run bf16_off 90 env ERNIE_ATTENTION_WRITES_CACHE=0 $B
echo "$(( $(date +%s) - START )) s"
