#!/usr/bin/env bash
# One device call: CUDA parity (issue 2), ernie bench on the full 21B-A3B shape and transformers' baseline (issue 4).
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/cuda_parity.py 2>&1 | grep -v -e Loading -e Writing | tee $OUT/parity.txt
python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -p 512 -n 128 -r 3 -o json > $OUT/ours.json 2> $OUT/ours.err
python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -p 0 -n 128 -d 8192 -r 3 -o json > $OUT/ours_depth.json 2>> $OUT/ours.err
python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -p 512 -n 128 -r 3 -o json > $OUT/ours_8l.json 2>> $OUT/ours.err
tail -3 $OUT/ours.err
python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err
python3 benchmarks/hf_baseline.py $CFG --experts eager -r 2 > $OUT/hf_eager.json 2>> $OUT/hf.err
tail -3 $OUT/hf.err
python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -p 512 -n 128 -r 3 | tee $OUT/ours.md
python3 benchmarks/summarize.py $OUT/ours.json $OUT/ours_depth.json $OUT/ours_8l.json $OUT/hf_grouped.json $OUT/hf_eager.json
