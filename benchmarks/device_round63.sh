#!/usr/bin/env bash
# Device call 63 (issue 7, branch wip/decode-fewer-kernels, after round 62): the quantized CUDA
# tests; int4 and int8 decode with the four changes and with all four off, same call; then the int4
# step's kernel profile, to see what the graph still launches. First, which model lines Inductor's small kernels of round 60 came from
# (select, index, split: about 80 a step): a 2-layer bf16 compile with its graphs and output code
# logged, read by benchmarks/kernel_sources.py.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCH_LOGS=output_code,post_grad_graphs,graph_code timeout 120 python3 -m ernie_cli bench \
  --config $CFG --device cuda --dtype bfloat16 --compile on -p 0 -n 8 -r 1 --layers 2 > /dev/null 2> $OUT/code.log
python3 benchmarks/kernel_sources.py $OUT/code.log > $OUT/kernel_sources.txt; gzip $OUT/code.log
grep -v "^== .*\(mm\|gemv\)" $OUT/kernel_sources.txt | head -60
timeout 120 python3 -m pytest -q -rf --tb=short -p no:warnings tests/test_quant_cuda.py 2>&1 | tail -3
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
OFF="env ERNIE_ROUTER_LOGITS=linear ERNIE_EXPERT_SUM=reduce ERNIE_ROUTE_WARPS=4 ERNIE_ATTENTION_COMBINE=kernel"
run int4_all 150 $B --quantize int4
run int4_off 110 $OFF $B --quantize int4
run int8_all 130 $B --quantize int8
run int8_off 110 $OFF $B --quantize int8
timeout 120 python3 benchmarks/gpu_profile.py $CFG --quantize int4 --top 30 2>&1 | grep -v -i warn > $OUT/profile_int4.txt
tail -12 $OUT/profile_int4.txt
echo "$(( $(date +%s) - START )) s"
