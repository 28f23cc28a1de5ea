"""The server's batched step alone (runtime/batch.BatchDecoder, no HTTP, no scheduler): median time of
one decode step at batch sizes 1, 4 and 8, alternating, on random int4 weights of the real shape.

Usage: python benchmarks/serve_engine_step.py [LAYERS] [--compare-thread]
    LAYERS defaults to 3 (one dense layer, two MoE); --compare-thread also drives each batch size
    from a second thread, alternating with the main one (where `ernie serve` runs its engine matters).
"""

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from ernie_cli.model.config import parse_config
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.runtime.batch import BatchDecoder, Sequence
from ernie_cli.runtime.sampling import SamplingParams
from ernie_cli.weights.loader import random_model

positional = [a for a in sys.argv[1:] if not a.startswith("--")]
layers = int(positional[0]) if positional else 3
places = ("main", "thread") if "--compare-thread" in sys.argv else ("main",)
raw = json.loads((Path(__file__).parent / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json").read_text())
cfg = parse_config(raw).replace(num_hidden_layers=layers, moe_layer_end_index=layers - 1)
engine = BatchDecoder(random_model(cfg, "cpu", torch.bfloat16, quantize=QuantSpec.make("int4")), 8192, 512)
print(f"{layers} layers, int4, torch threads {torch.get_num_threads()}")


def median_step_ms(batch: int) -> float:
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
    return statistics.median(times[3:]) * 1000


def on(place: str, batch: int) -> float:
    if place == "main":
        return median_step_ms(batch)
    out = []
    t = threading.Thread(target=lambda: out.append(median_step_ms(batch)))
    t.start()
    t.join()
    return out[0]


for rep in range(3):
    print("; ".join(f"{place} batch {b}: {on(place, b):.1f} ms/step" for b in (1, 4, 8) for place in places))
