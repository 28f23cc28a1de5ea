"""Where one decode step's time goes on CUDA: every kernel of the captured graph, grouped.

Usage (GPU machine): python benchmarks/gpu_profile.py CONFIG [--layers N] [--quantize int8|int4] [--steps 20]
                                                         [--mode compile|graph]

Builds the model with random weights on the GPU, makes the decode step as `ernie bench --compile on`
(Inductor) or `ernie complete` and `ernie bench` by default (graph: captured from the eager code) do, times `--steps` steps (median of CUDA-event times), then records them with torch.profiler (CUPTI
reports the kernels inside CUDA-graph replays) and prints, per step: each kernel's count and time,
kernel time by kind, and the gap between the step's wall time and the sum of its kernels (launch and
idle time between kernels, which is what fusing kernels wins back).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ernie_cli.model.config import parse_config
from ernie_cli.quant.load import quantize_in_place
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.weights.loader import prepare_for_decoding, random_model

KINDS = (  # first match wins
    ("Triton GEMV (gpu_gemv)", ("_gemv",)),
    ("Triton norm, RoPE, router, dequantize", ("_rms_norm", "_rope", "_route", "_dequantize")),
    ("cuBLAS GEMV/GEMM", ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "splitkreduce")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "efficient")),
    ("Inductor fused ops", ("triton_",)),
    ("copies / index / topk", ("copy", "index", "topk", "sort", "gather", "scatter", "elementwise", "reduce")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--quantize", choices=("int8", "int4"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--mode", choices=("compile", "graph"), default="graph")
    args = ap.parse_args()

    cfg = parse_config(json.loads(open(args.config).read()))
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers, moe_layer_end_index=min(cfg.moe_layer_end_index, args.layers - 1))
    t0 = time.perf_counter()
    model = random_model(cfg, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    if args.quantize:
        model = quantize_in_place(model, QuantSpec.make(args.quantize))
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    decoder = Decoder(prepare_for_decoding(model, args.mode), args.mode)
    cache = decoder.reserve(512)
    tok = torch.tensor([[1000]], device="cuda")
    with torch.inference_mode():
        model(tok, 0, cache)
        for p in range(1, 8):  # compile, capture, warm
            decoder(tok, p)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        print(f"build {t1 - t0:.1f} s, quantize {t2 - t1:.1f} s, {args.mode} and warm-up {t3 - t2:.1f} s", flush=True)
        times = []
        for p in range(8, 8 + args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            decoder(tok, p)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1000)
        step_us = statistics.median(times)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for p in range(8, 8 + args.steps):
                decoder(tok, p)
            torch.cuda.synchronize()

    per_name: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name].append(ev.time_range.elapsed_us())
    steps = args.steps
    rows = sorted(((sum(v) / steps, len(v) / steps, n) for n, v in per_name.items()), reverse=True)
    busy = sum(r[0] for r in rows)
    launches = sum(r[1] for r in rows)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for us, count, name in rows:
        by_kind[kind_of(name)][0] += us
        by_kind[kind_of(name)][1] += count

    label = f"{cfg.num_hidden_layers} layers, {args.quantize or 'bf16'}, step mode {args.mode}"
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {label}")
    print(f"\nTop kernels per decode step (of {len(rows)} distinct):")
    print("| kernel | per step | µs per step | µs each |")
    print("|---|---:|---:|---:|")
    for us, count, name in rows[: args.top]:
        print(f"| {name[:90]} | {count:.0f} | {us:.1f} | {us / count:.2f} |")
    print("\n| kind | kernels per step | µs per step | share of step |")
    print("|---|---:|---:|---:|")
    for kind, (us, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {count:.0f} | {us:.0f} | {us / step_us:.0%} |")
    print(f"| **all kernels** | {launches:.0f} | {busy:.0f} | {busy / step_us:.0%} |")
    print(f"| gaps between kernels (step − kernels) | | {step_us - busy:.0f} | {(step_us - busy) / step_us:.0%} |")
    print(f"\nstep: {step_us:.0f} µs median of {steps} ({1e6 / step_us:.1f} tok/s)")


if __name__ == "__main__":
    main()
