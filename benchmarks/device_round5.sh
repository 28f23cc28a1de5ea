#!/usr/bin/env bash
# Device call 5 (issue 7): the Triton one-token GEMVs. Correctness first (kernel tests, CUDA parity
# of the tiny shapes with greedy/compiled-vs-eager, quantized CUDA vs CPU), then the kernel table,
# then ernie bench on the 8-layer shape with and without them (ERNIE_TRITON=0) in the same call.
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 150 python3 -m pytest -q -x tests/test_gpu_gemv.py tests/test_quant_cuda.py 2>&1 | tail -4
timeout 150 python3 benchmarks/cuda_parity.py > $OUT/parity.txt 2>&1; tail -12 $OUT/parity.txt
timeout 120 python3 benchmarks/gpu_gemv_bench.py > $OUT/gemv.txt 2> $OUT/gemv.err || tail -5 $OUT/gemv.err
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -r 5 -p 512 -n 128 -o json --compile on"
for q in none int8 int4; do
  Q=""; [ $q != none ] && Q="--quantize $q"
  timeout 80 $B $Q > $OUT/${q}_8l.json 2>> $OUT/err.txt
  ERNIE_TRITON=0 timeout 80 $B -p 0 $Q > $OUT/${q}_8l_inductor.json 2>> $OUT/err.txt
done
grep -v -i warn $OUT/err.txt | grep -i -A3 error | tail -12
cat $OUT/gemv.txt
for f in none_8l none_8l_inductor int8_8l int8_8l_inductor int4_8l int4_8l_inductor; do echo -n "$f: "; python3 -c "
import json,statistics
for r in json.load(open('$OUT/$f.json')): print(r['test'], round(statistics.median(r['tokens_per_s']),1), round(r.get('bandwidth_gb_s') or 0), end='  ')
print()" 2>/dev/null || echo failed; done
