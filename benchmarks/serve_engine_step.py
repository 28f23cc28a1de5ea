"""The server's batched decode step alone (runtime/batch.BatchDecoder, no HTTP, no scheduler): median
time of one step at each batch size, the sizes taking turns, on random weights of the real shape.

Usage: python benchmarks/serve_engine_step.py [LAYERS] [--quantize int4|int8|none] [--device cpu|cuda]
           [--batches 1,4,8] [--compare-thread]
    LAYERS defaults to 3 (one dense layer, two MoE; 0: all of them); --quantize defaults to int4;
    --compare-thread also drives each batch size from a second thread, alternating with the main one
    (where `ernie serve` runs its engine matters). On CUDA the engine captures its graphs first, as
    `ernie serve` does at start-up, and steps queue ahead as they do when serving greedy requests.
"""

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from ernie_cli.model.config import parse_config
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.runtime.batch import BatchDecoder, Sequence
from ernie_cli.runtime.sampling import SamplingParams
from ernie_cli.runtime.decoder import step_mode
from ernie_cli.weights.loader import prepare_for_decoding, random_model, resolve_device

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("layers", nargs="?", type=int, default=3)
ap.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
ap.add_argument("--device", default="cpu")
ap.add_argument("--batches", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
ap.add_argument("--steps", type=int, default=15, help="timed steps per batch size and round")
ap.add_argument("--compare-thread", action="store_true")
args = ap.parse_args()

raw = json.loads((Path(__file__).parent / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json").read_text())
cfg = parse_config(raw)
if args.layers:
    cfg = cfg.replace(num_hidden_layers=args.layers, moe_layer_end_index=args.layers - 1)
device = resolve_device(args.device)
spec = None if args.quantize == "none" else QuantSpec.make(args.quantize)
model = prepare_for_decoding(random_model(cfg, device, torch.bfloat16, quantize=spec), step_mode("auto", device))  # as `ernie serve` loads
engine = BatchDecoder(model, 8192 * 4, 512)
engine.warm(max(args.batches))
places = ("main", "thread") if args.compare_thread else ("main",)
print(f"{cfg.num_hidden_layers} layers, {args.quantize}, {device}, torch threads {torch.get_num_threads()}")


def median_step_ms(batch: int) -> float:
    seqs = [Sequence(list(range(1000 + i, 1016 + i)), 400, SamplingParams(temperature=0)) for i in range(batch)]
    for s in seqs:
        engine.admit(s)
    engine.step(seqs)  # the prompts
    times = []
    for _ in range(args.steps + 3):
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
    print("; ".join(f"{place} batch {b}: {on(place, b):.2f} ms/step" for b in args.batches for place in places))
