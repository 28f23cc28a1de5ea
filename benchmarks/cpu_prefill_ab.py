"""Prefill on the CPU, native int kernels against expanding each weight to floats for torch's matmul
(quant/native.PREFILL_TOKENS), alternated in one process on the same model.

Usage: python benchmarks/cpu_prefill_ab.py [LAYERS] [FORMAT]    (default: 8 int4; layer 0 dense, the
rest MoE, the 21B-A3B shapes, random weights quantized in memory, 2 threads)
Prints pp512 and pp64 tok/s of each way, three alternating rounds each, then the medians.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from ernie_cli.bench import BenchCase, run_test
from ernie_cli.config import parse_config
from ernie_cli.loader import quantize_model, random_model
from ernie_cli.kernels.cpu import native

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
fmt = sys.argv[2] if len(sys.argv) > 2 else "int4"
torch.set_num_threads(2)
raw = json.load(open("benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json"))
cfg = parse_config(raw).replace(num_hidden_layers=layers, moe_layer_end_index=min(raw["moe_layer_end_index"], layers - 1))
model = quantize_model(random_model(cfg, "cpu", torch.bfloat16), fmt)
ways = {"native int kernels": 1 << 30, "floats + torch matmul": native.PREFILL_TOKENS}
rates: dict[tuple[str, int], list[float]] = {}
for _ in range(3):
    for way, threshold in ways.items():
        native.PREFILL_TOKENS = threshold
        for p in (512, 64):
            r = run_test(model, BenchCase(p, 0), repetitions=1)
            rates.setdefault((way, p), []).append(r.tokens_per_s[0])
            print(way, f"pp{p}", round(r.tokens_per_s[0], 1), flush=True)
print(f"\n{layers} layers, {fmt}, {torch.get_num_threads()} threads; medians of 3 alternating rounds")
print("| prefill | pp512 tok/s | pp64 tok/s |")
print("|---|---:|---:|")
for way in ways:
    print(f"| {way} | {statistics.median(rates[(way, 512)]):.1f} | {statistics.median(rates[(way, 64)]):.1f} |")
