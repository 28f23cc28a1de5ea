#!/usr/bin/env bash
# Device call 4: Inductor coordinate-descent tuning on/off for the compiled decode (8-layer shape),
# and transformers' grouped_mm baseline on the full shape on the same card.
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m ernie_cli bench --config $CFG --layers 8 --device cuda --dtype bfloat16 -r 5 -p 0 -n 128 -o json --compile on"
for q in none int8 int4; do
  Q=""; [ $q != none ] && Q="--quantize $q"
  timeout 70 $B $Q > $OUT/${q}_plain.json 2>> $OUT/err.txt
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 timeout 90 $B $Q > $OUT/${q}_tuned.json 2>> $OUT/err.txt
done
timeout 120 python3 benchmarks/hf_baseline.py $CFG --experts grouped_mm -r 3 > $OUT/hf_grouped.json 2> $OUT/hf.err
grep -h -i "error" $OUT/err.txt $OUT/hf.err | grep -v -i warn | tail -5
for f in none_plain none_tuned int8_plain int8_tuned int4_plain int4_tuned; do echo -n "$f: "; python3 -c "import json,statistics; r=json.load(open('$OUT/$f.json'))[0]; print(round(statistics.median(r['tokens_per_s']),1), round(r['bandwidth_gb_s']))" 2>/dev/null || echo failed; done
cat $OUT/hf_grouped.json
