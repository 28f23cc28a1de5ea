#!/usr/bin/env bash
# Device call 64b (issue 7, branch wip/decode-fewer-kernels): the last 185 s of the twelfth session's
# device time, on round 64's machine. It ran as one command line; kept here as run. Why the compile
# analysis test failed (the whole failure), then int4 with all six changes; the run without them did
# not fit.
source benchmarks/device_env.sh
timeout 40 python3 -m pytest -q -x --tb=long -p no:warnings tests/test_gpu_gemv.py -k "torch_compile or written" 2>&1 | tail -60
B="python3 -m ernie_cli bench --config $CFG --device cuda --dtype bfloat16 -o json --compile on -p 0 -n 128 -r 5"
run int4_all 130 $B --quantize int4
