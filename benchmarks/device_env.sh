# Sourced by the device_round*.sh scripts: the packages the device image lacks (carried as wheels in
# .whl, see the device tool's README) and this checkout installed without touching the network.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
CFG=benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json
# run NAME SECONDS COMMAND...: one `ernie bench -o json` call under a time limit; prints each test's
# runs, median and peak GPU memory on one line (or why it failed), and keeps the JSON in $OUT.
run() {
  local name=$1 limit=$2 s; shift 2; s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo -n "$name ($(( $(date +%s) - s )) s): "
  python3 -c "
import json, statistics
for r in json.load(open('$OUT/$name.json')):
    print(r['test'], 'd%d' % r['depth'], [round(t, 1) for t in r['tokens_per_s']], round(statistics.median(r['tokens_per_s']), 1),
          'peak GiB', round(r['peak_memory_bytes'] / 2**30, 2), end='  ')
print()" 2>/dev/null || { echo failed; grep -v -i warn "$OUT/$name.err" | tail -8; }
  grep -h "could not be captured" "$OUT/$name.err" | head -2  # ernie's own fallback warnings
  rm -f "$OUT/$name.err"
}
