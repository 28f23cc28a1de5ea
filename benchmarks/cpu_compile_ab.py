"""CPU decode, eager against `--compile on` (Inductor's C++ for the small ops, the native int kernels
kept as one operator each), alternating on one int4 model: the same steps, median ms per token.

Usage: python benchmarks/cpu_compile_ab.py [LAYERS]   (default 3: layer 0 dense, then MoE; 21B-A3B
shapes, random weights quantized in memory, 2 threads)
"""

import json
import statistics
import sys
import time

import torch

from ernie_cli.config import parse_config
from ernie_cli.generate import Decoder
from ernie_cli.loader import quantize_model, random_model

torch.set_num_threads(2)
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 3
raw = json.load(open("benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json"))
cfg = parse_config(raw).replace(num_hidden_layers=layers, moe_layer_end_index=layers - 1)
model = quantize_model(random_model(cfg, "cpu", torch.bfloat16), "int4")
model.setup_cache(1, 256)
ids = torch.randint(3, 1000, (1, 256))


def median_ms(decoder, start, steps=20):
    times = []
    for i in range(start, start + steps):
        t = time.perf_counter()
        decoder(ids[:, i : i + 1], i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


with torch.inference_mode():
    model(ids[:, :1], 0)
    eager = Decoder(model)
    t = time.perf_counter()
    compiled = Decoder(model, compile=True)
    for i in range(1, 4):
        compiled(ids[:, i : i + 1], i)
    print("compile + 3 steps", round(time.perf_counter() - t, 1), "s", flush=True)
    a, b = eager(ids[:, 4:5], 4), compiled(ids[:, 4:5], 4)
    print("max |eager - compiled| logits", (a.float() - b.float()).abs().max().item(), "scale", a.float().abs().max().item())
    pos, ms = 5, {"eager": [], "compiled": []}
    for _ in range(3):
        for name, decoder in (("eager", eager), ("compiled", compiled)):
            ms[name].append(round(median_ms(decoder, pos), 2))
            pos += 20
print(ms, {name: statistics.median(v) for name, v in ms.items()})
