"""The server's batched step alone (runtime/batch.BatchDecoder, no HTTP, no scheduler): median time of
one decode step at batch sizes 1, 4 and 8, alternating, on random int4 weights of the real shape.

Usage: python benchmarks/serve_engine_step.py [LAYERS]     (default 3: one dense layer, two MoE)
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ernie_cli.model.config import parse_config
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.runtime.batch import BatchDecoder, Sequence
from ernie_cli.runtime.sampling import SamplingParams
from ernie_cli.weights.loader import random_model

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 3
raw = json.loads((Path(__file__).parent / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json").read_text())
cfg = parse_config(raw).replace(num_hidden_layers=layers, moe_layer_end_index=layers - 1)
engine = BatchDecoder(random_model(cfg, "cpu", torch.bfloat16, quantize=QuantSpec.make("int4")), 8192, 512)
print(f"{layers} layers, int4, torch threads {torch.get_num_threads()}")
for rep in range(3):
    for batch in (1, 4, 8):
        seqs = [Sequence(list(range(1000 + i, 1016 + i)), 400, SamplingParams(temperature=0)) for i in range(batch)]
        for s in seqs:
            engine.admit(s)
        engine.step(seqs)  # the prompts
        times = []
        for _ in range(15):
            start = time.perf_counter()
            engine.step(seqs)
            times.append(time.perf_counter() - start)
        for s in seqs:
            engine.release(s)
        print(f"batch {batch}: {statistics.median(times[3:]) * 1000:.1f} ms/step", end="; " if batch < 8 else "\n")
