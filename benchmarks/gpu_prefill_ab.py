"""Eager prefill on CUDA: the shipped code against its earlier forms, alternating in one process, then
where the shipped prefill's time goes.

Usage (GPU machine): python benchmarks/gpu_prefill_ab.py CONFIG [--layers N] [--quantize int8|int4] [-p 512] [-r 7]

Variants (the earlier forms are rebuilt here by switching the new pieces off):
- shipped: Triton RMSNorm and RoPE (gpu_elementwise); the MoE tail of model.run_grouped_mm (expert
  offsets by searchsorted, outputs weighed by one batched product)
- torch norm/rope: RMSNorm and RoPE in torch ops again (8 kernels each)
- old MoE tail: offsets by torch.bincount (it reads its maximum back to the host each layer), outputs
  added with index_add_ (atomics) into a zeroed tensor
- both old: the two above together (the code before this change)
Each round times every variant once (synchronised wall time of one forward over P tokens), in turn,
so a slow phase of the host hits all of them; medians over the rounds.

Then, for the shipped code: the host syncs of one forward (torch.cuda sync debug mode), the time
Python takes to queue one forward (no sync) against its wall time, and torch.profiler over three
forwards: GPU kernel time by kind and the top kernels. If the kernels' sum is well under the wall
time and queueing takes as long as the wall, Python queueing kernels is the limit, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_profile import kind_of  # noqa: E402

from ernie_cli import gpu_elementwise, model as model_module  # noqa: E402
from ernie_cli.config import parse_config  # noqa: E402
from ernie_cli.loader import quantize_model, random_model  # noqa: E402
from ernie_cli.quant import modules as quant_modules  # noqa: E402


def grouped_mm_with_bincount(x, weights, idx, gate_up, down):
    """The earlier run_grouped_mm: the same products, offsets from torch.bincount (a host sync),
    outputs summed by index_add_."""
    k = idx.shape[1]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    tokens = order // k
    gm = model_module.GROUPED_MM
    gate, up = gm(x[tokens], gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    y = gm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    y = y * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, tokens, y)


SHIPPED_MM = model_module.run_grouped_mm
SHIPPED_USABLE = gpu_elementwise.usable


def set_variant(name: str) -> None:
    old_elementwise = name in ("torch norm/rope", "both old")
    old_offsets = name in ("old MoE tail", "both old")
    gpu_elementwise.usable = (lambda x: False) if old_elementwise else SHIPPED_USABLE
    mm = grouped_mm_with_bincount if old_offsets else SHIPPED_MM
    model_module.run_grouped_mm = mm
    quant_modules.run_grouped_mm = mm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--quantize", choices=("int8", "int4"))
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-r", "--rounds", type=int, default=7)
    args = ap.parse_args()

    cfg = parse_config(json.loads(open(args.config).read()))
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers, moe_layer_end_index=min(cfg.moe_layer_end_index, args.layers - 1))
    model = random_model(cfg, "cuda", torch.bfloat16)
    if args.quantize:
        model = quantize_model(model, args.quantize)
    model.setup_cache(1, args.prompt + 256)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    variants = ["shipped", "torch norm/rope", "old MoE tail", "both old"]
    times: dict[str, list[float]] = defaultdict(list)

    def forward() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, 0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        outs = {}
        for v in variants:  # warm-up, and the variants must compute the same logits
            set_variant(v)
            forward()
            outs[v] = model(ids, 0).float()
        for r in range(args.rounds):
            for v in variants:
                set_variant(v)
                times[v].append(forward())
        set_variant("shipped")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            model(ids, 0)
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0][:100] for w in caught if "synchroniz" in str(w.message)]
        queue = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids, 0)
            queue.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model(ids, 0)
            torch.cuda.synchronize()

    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            for table, key in ((per_kind, kind_of(ev.name)), (per_name, ev.name)):
                table[key][0] += ev.time_range.elapsed_us() / 3
                table[key][1] += 1 / 3

    label = f"{cfg.num_hidden_layers} layers, {args.quantize or 'bf16'}, pp{args.prompt}"
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {label}")
    base = outs["both old"]
    print("\n| variant | ms (median) | tok/s | max |logit diff| vs both old |")
    print("|---|---:|---:|---:|")
    for v in variants:
        ms = statistics.median(times[v]) * 1000
        print(f"| {v} | {ms:.2f} | {args.prompt / ms * 1000:,.0f} | {(outs[v] - base).abs().max().item():.3g} |")
    wall_us = statistics.median(times["shipped"]) * 1e6
    busy = sum(us for us, _ in per_kind.values())
    print("\n| kind (shipped) | kernels | µs | share of wall |")
    print("|---|---:|---:|---:|")
    for kind, (us, count) in sorted(per_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {count:.0f} | {us:.0f} | {us / wall_us:.0%} |")
    print(f"| **all kernels** | {sum(c for _, c in per_kind.values()):.0f} | {busy:.0f} | {busy / wall_us:.0%} |")
    print("\n| top kernels (shipped) | per forward | µs |")
    print("|---|---:|---:|")
    for name, (us, count) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"| {name[:80]} | {count:.0f} | {us:.0f} |")
    print(f"\nhost syncs in one forward: {len(syncs)} {sorted(set(syncs))[:3]}")
    print(f"Python queueing one forward (no sync): {statistics.median(queue) * 1000:.2f} ms; wall {wall_us / 1000:.2f} ms")


if __name__ == "__main__":
    main()
