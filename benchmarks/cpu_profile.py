"""Where one CPU int4 decode step spends its time: torch.profiler over 20 steps of a 3-layer model
(layer 0 dense, 1-2 MoE) with the 21B-A3B shapes, random weights quantized to int4 in memory.

Usage: python benchmarks/cpu_profile.py
"""
import json, torch, time
from ernie_cli.config import parse_config
from ernie_cli.loader import random_model, quantize_model
from ernie_cli.generate import Decoder
torch.set_num_threads(2)
raw = json.load(open("benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json"))
cfg = parse_config(raw).replace(num_hidden_layers=3, moe_layer_end_index=2)
m = quantize_model(random_model(cfg, "cpu", torch.bfloat16), "int4")
m.setup_cache(1, 64)
ids = torch.randint(3, 1000, (1, 40))
dec = Decoder(m)
with torch.inference_mode():
    m(ids[:, :1], 0)
    for i in range(1, 6): dec(ids[:, i:i+1], i)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for i in range(6, 26): dec(ids[:, i:i+1], i)
        el = time.perf_counter() - t
print("ms/token (3 layers)", el / 20 * 1000)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
