#!/usr/bin/env bash
# One measurement on a CUDA machine, run from the repository root: installs this checkout, prints the
# GPU, runs MODE under a time limit, and prints a short table last.
#
# Usage: bash benchmarks/gpu_run.sh MODE [ARGS...]
#   bench [OPTIONS...]    `ernie bench -o json`; without -m or --config, the full 21B-A3B shape with random
#                         weights. Defaults --device cuda --dtype bfloat16 -p 512 -n 128 -r 5 (the step as `ernie bench` makes it);
#                         naming an option again overrides it (the last value wins), e.g. -p 0 --quantize int4
#   hf [OPTIONS...]       benchmarks/hf_baseline.py on the same shape: transformers' own speed
#   parity [SHAPE...]     benchmarks/cuda_parity.py: the CUDA path against transformers' float32
#   tests [PYTEST ARGS]   the tests that need a GPU (default: every file of them)
#   profile [OPTIONS...]  benchmarks/gpu_profile.py on the same shape: where a decode step's time goes
#   gemv [FORMAT...]      benchmarks/gpu_gemv_bench.py: the one-token kernels inside a CUDA graph
#   oneshot TOKENIZER_DIR [ARGS]   benchmarks/oneshot.py: fresh `ernie complete` processes against the floor F
#   serve TOKENIZER_DIR [ARGS]     benchmarks/serve_bench.py: `ernie serve`'s app on random weights of the full
#                         shape (bf16; -c 1,8,64 -p 128 -n 256 unless given), then the engine's step alone
#                         (benchmarks/serve_engine_step.py); needs uvicorn and starlette (carried as wheels in .whl/)
#
# LIMIT (seconds, default 540) bounds the run; OUT (default a new temporary directory) keeps its whole
# output. ERNIE_TRITON=0 and ERNIE_NATIVE=0 reach the run like any environment variable.
set -u
cd "$(dirname "$0")/.."
MODE=${1:-}; shift || true
case "$MODE" in
  bench|hf|parity|tests|profile|gemv|oneshot|serve) ;;
  *) echo "error: unknown mode '$MODE': use bench, hf, parity, tests, profile, gemv, oneshot or serve (see the head of $0)" >&2; exit 2 ;;
esac
source benchmarks/device_env.sh
LIMIT=${LIMIT:-540}
nvidia-smi --query-gpu=name,uuid,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU visible"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
env | grep '^ERNIE_' || true
LOG=$OUT/$MODE.log
TABLE=$OUT/$MODE.table  # what each mode prints last
: > "$TABLE"

given() {  # whether any of the options after -- is among the arguments before it
  local a o args=() opts=() seen=0
  for a in "$@"; do if [ "$a" = -- ]; then seen=1; elif (( seen )); then opts+=("$a"); else args+=("$a"); fi; done
  for a in "${args[@]}"; do for o in "${opts[@]}"; do [ "$a" = "$o" ] && return 0; done; done
  return 1
}

limited() { timeout "$LIMIT" "$@"; local rc=$?; (( rc == 124 )) && echo "stopped at the $LIMIT s limit" >&2; return $rc; }

start=$(date +%s)
case "$MODE" in
  bench)
    model=(--config "$CFG"); given "$@" -- -m --model --config && model=()
    limited python3 -m ernie_cli bench "${model[@]}" --device cuda --dtype bfloat16 -p 512 -n 128 -r 5 "$@" \
      -o json > "$OUT/bench.json" 2> "$LOG"
    rc=$?; grep -v -i warn "$LOG" | tail -8 >&2
    python3 - "$OUT/bench.json" > "$TABLE" <<'PY' || echo "no result: see $LOG" >&2
import json, statistics, sys
rows = json.load(open(sys.argv[1]))
print("| test | depth | runs (tok/s) | median | weight GB/s | peak GiB | device |\n|---|---:|---|---:|---:|---:|---|")
for r in rows:
    runs = ", ".join(f"{t:,.1f}" for t in r["tokens_per_s"])
    gbs = f"{r['bandwidth_gb_s']:,.0f}" if r["bandwidth_gb_s"] else ""
    print(f"| {r['test']} | {r['depth']} | {runs} | **{statistics.median(r['tokens_per_s']):,.1f}** | {gbs} "
          f"| {r['peak_memory_bytes'] / 2**30:.2f} | {r['device_name']}, {r['quantization']}, commit {r['commit']} |")
PY
    ;;
  hf)
    limited python3 benchmarks/hf_baseline.py "$CFG" "$@" > "$OUT/hf.jsonl" 2> "$LOG"
    rc=$?; grep -v -i warn "$LOG" | tail -4 >&2
    python3 - "$OUT/hf.jsonl" > "$TABLE" <<'PY' || echo "no result: see $LOG" >&2
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("| engine | layers | test | median tok/s |\n|---|---:|---|---:|")
for r in rows:
    print(f"| {r['engine']} | {r['layers']} | {r['test']} | **{r['median_tokens_per_s']:,.1f}** |")
PY
    ;;
  parity)
    limited python3 benchmarks/cuda_parity.py "$@" > "$LOG" 2>&1; rc=$?
    grep -v "^|\|PARITY" "$LOG" | grep -v -i warn | tail -6; grep "^|\|PARITY" "$LOG" > "$TABLE"
    ;;
  tests)
    (( $# )) || set -- tests/test_gpu_*.py tests/test_quant_cuda.py tests/test_prefill_graphs.py
    limited python3 -m pytest -q -rf --tb=short -p no:warnings "$@" > "$LOG" 2>&1; rc=$?
    { grep -E "^(FAILED|ERROR)" "$LOG" | head -20; tail -1 "$LOG"; } > "$TABLE"
    ;;
  profile)
    limited python3 benchmarks/gpu_profile.py "$CFG" "$@" > "$LOG" 2>&1; rc=$?
    grep -v -i warn "$LOG" | tail -45 > "$TABLE"
    ;;
  gemv)
    limited python3 benchmarks/gpu_gemv_bench.py "$@" > "$LOG" 2>&1; rc=$?
    grep -v -i warn "$LOG" | tail -40 > "$TABLE"
    ;;
  oneshot)
    (( $# )) || { echo "error: oneshot needs the tokenizer directory: bash benchmarks/gpu_run.sh oneshot TOKENIZER_DIR" >&2; exit 2; }
    tok=$1; shift
    limited python3 benchmarks/oneshot.py "$tok" "${WORK:-/tmp/oneshot}" "$@" > "$LOG" 2>&1; rc=$?
    sed -n '/^NVIDIA\|^| /p' "$LOG" > "$TABLE"
    ;;
  serve)
    (( $# )) || { echo "error: serve needs the tokenizer directory: bash benchmarks/gpu_run.sh serve TOKENIZER_DIR" >&2; exit 2; }
    tok=$1; shift
    (( $# )) || set -- -c 1,8,64 -p 128 -n 256
    limited python3 benchmarks/serve_bench.py --config "$CFG" --tokenizer "$tok" --device cuda "$@" > "$LOG" 2>&1; rc=$?
    limited python3 benchmarks/serve_engine_step.py 0 --quantize none --device cuda --batches 1,8,64 --steps 30 >> "$LOG" 2>&1
    sed -n '/^| \|ms\/step\|captured/p' "$LOG" > "$TABLE"
    ;;
esac
echo "$MODE: $(( $(date +%s) - start )) s, exit $rc; whole output in $OUT"
cat "$TABLE"
exit $rc
