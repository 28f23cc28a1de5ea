"""Where one CPU int4 decode step spends its time: cProfile over 20 decode steps of a 3-layer model
(layer 0 dense, 1-2 MoE) with the 21B-A3B shapes, random weights quantized to int4 in memory.

cProfile rather than torch.profiler: the native int kernels are ctypes calls, which torch.profiler
does not see; cProfile charges their time to ernie_cli/quant/native.py's int4/int8 functions.

Usage: python benchmarks/cpu_profile.py
"""
import cProfile
import json
import pstats
import time

import torch

from ernie_cli.model.config import parse_config
from ernie_cli.quant.load import quantize_in_place
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.weights.loader import random_model

torch.set_num_threads(2)
raw = json.load(open("benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json"))
cfg = parse_config(raw).replace(num_hidden_layers=3, moe_layer_end_index=2)
m = quantize_in_place(random_model(cfg, "cpu", torch.bfloat16), QuantSpec.make("int4"))
ids = torch.randint(3, 1000, (1, 60))
dec = Decoder(m)
with torch.inference_mode():
    m(ids[:, :1], 0, dec.reserve(64))
    for i in range(1, 6):
        dec(ids[:, i : i + 1], i)
    t = time.perf_counter()
    for i in range(6, 26):
        dec(ids[:, i : i + 1], i)
    print(f"ms/token (3 layers, unprofiled): {(time.perf_counter() - t) / 20 * 1000:.1f}")
    profile = cProfile.Profile()
    profile.enable()
    for i in range(26, 46):
        dec(ids[:, i : i + 1], i)
    profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(int(__import__("os").environ.get("TOP", "15")))
