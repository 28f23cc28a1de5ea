#!/usr/bin/env bash
# Device call 63 (issue 7, branch wip/decode-fewer-kernels, after round 62): which model lines
# Inductor's small kernels come from (a 2-layer bf16 compile with its graphs and output code logged,
# read by benchmarks/kernel_sources.py: what is left of round 60's small kernels);
# then bf16 with all six changes again and with the last four of round 62's list off, same call.
set -u
START=$(date +%s)
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCH_LOGS=output_code,post_grad_graphs,graph_code timeout 120 python3 -m ernie_cli bench \
  --config $CFG --device cuda --dtype bfloat16 --compile on -p 0 -n 8 -r 1 --layers 2 > /dev/null 2> $OUT/code.log
python3 benchmarks/kernel_sources.py $OUT/code.log > $OUT/kernel_sources.txt; gzip $OUT/code.log
grep -v "^== .*\(mm\|gemv\)" $OUT/kernel_sources.txt | head -60
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run bf16_all 150 $B
run bf16_route_warps4 85 env ERNIE_ROUTE_WARPS=4 $B
run bf16_combine_kernel 85 env ERNIE_ATTENTION_COMBINE=kernel $B
run bf16_idx_copied 85 env ERNIE_GEMV_IDX_LOOKS_WRITTEN=1 $B
run bf16_rope_rows_graph 85 env ERNIE_ROPE_ROWS=graph $B
echo "$(( $(date +%s) - START )) s"
