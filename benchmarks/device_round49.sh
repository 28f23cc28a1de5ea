#!/usr/bin/env bash
# Device call 49 (issue 7): rounds 47-48 measured the branch's old path (shared MLP separate, weighted
# down off) at int8 377 and int4 419 tok/s, where main had 462 and 467 in the eighth session while
# bf16 ran 8% faster than then. Main (copied under _main, untracked, run from there so it is imported first) against the branch's chosen
# setting (shared experts in the stack, weighted down off), tg128 only, in one call.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
cd _main; run main_int8 80 ${B/$CFG/..\/$CFG} --quantize int8; cd ..
run branch_int8 80 env ERNIE_SHARED_IN_EXPERTS=1 ERNIE_WEIGHTED_DOWN=0 $B --quantize int8
cd _main; run main_int4 80 ${B/$CFG/..\/$CFG} --quantize int4; cd ..
(cd _main && python3 -c "import ernie_cli.kernels.triton.gemv as g; print('main package from', g.__file__, hasattr(g, 'WEIGHTED_DOWN'))")
