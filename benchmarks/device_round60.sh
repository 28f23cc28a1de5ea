#!/usr/bin/env bash
# Device call 60 (issue 7, branch wip/attention-writes-cache, after rounds 56-59): the int4 and bf16
# decode steps' kernel profiles with both of the branch's changes on, to see what still fills the
# ~1 ms a step that is not weight reading.
set -u
source benchmarks/device_env.sh
exec > >(tee $OUT/log.txt) 2>&1
for q in int4 bf16; do
  flag=$([ $q = bf16 ] || echo "--quantize $q")
  timeout 200 python3 benchmarks/gpu_profile.py $CFG $flag --top 30 2>&1 | grep -v -i warn > $OUT/profile_$q.txt
  echo "== $q"; tail -40 $OUT/profile_$q.txt
done
