#!/usr/bin/env bash
# Device call 68 (issue 7, after round 67 measured the last-program weighing 3.7% slower and it was
# removed): the attention tests and the MoE parity check on the attention as it is now (its second
# kernel again), then the issue's table in bf16 with transformers' grouped_mm in the same call.
# int8, int4 and the last single-change pair follow in round 69.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit --format=csv,noheader
pids=()
timeout 170 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_gpu_attention.py tests/test_gpu_attention_writes.py > $OUT/attention.txt 2>&1 & pids+=($!)
timeout 170 python3 benchmarks/cuda_parity.py moe > $OUT/parity.txt 2>&1 & pids+=($!)
wait "${pids[@]}"; echo "attention: $(tail -1 $OUT/attention.txt)"; grep FAILED $OUT/attention.txt | head -5
grep "^|\|PARITY\|Error" $OUT/parity.txt | tail -12
echo "tests done at $(( $(date +%s) - START )) s"
within() { local left=$(( 590 - ($(date +%s) - START) )); (( $1 < left )) && echo $1 || echo $left; }
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 512 -n 128"
run table_bf16 $(within 220) $B -r 5 -d 0,8192
s=$(date +%s); timeout $(within 130) python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err
echo "hf ($(( $(date +%s) - s )) s)"; cut -c 1-300 $OUT/hf_grouped.json; grep -v -i warn $OUT/hf.err | tail -2
echo "$(( $(date +%s) - START )) s"
