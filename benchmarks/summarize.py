"""Print one markdown table from `ernie bench -o json` files and hf_baseline.py JSON lines."""

import json
import sys

rows = []
for path in sys.argv[1:]:
    text = open(path).read().strip()
    if not text:
        continue
    records = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.startswith("{")]
    for r in records:
        if "engine" in r:
            rows.append((r["engine"], r["layers"], r["test"], r["median_tokens_per_s"], None, r["device"]))
        else:
            import statistics
            med = statistics.median(r["tokens_per_s"])
            q = r["quantization"] if r["quantization"] != "none" else r["dtype"]
            rows.append((f"ernie ({q})", r["layers"], r["test"], med, r["bandwidth_gb_s"], r["device_name"]))
print("| engine | layers | test | median tok/s | GB/s (weights) | device |")
print("|---|---:|---|---:|---:|---|")
for e, l, t, tps, gbs, d in rows:
    print(f"| {e} | {l} | {t} | {tps:,.1f} | {'-' if gbs is None else f'{gbs:,.0f}'} | {d} |")
