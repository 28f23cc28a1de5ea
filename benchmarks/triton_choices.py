"""Print the Triton tuners' choices for every shape a model meets, in the form of
ernie_cli/kernels/triton/choices.json (read by tuned.py); --write puts this card's entry into that file.

Usage (GPU machine): python benchmarks/triton_choices.py [--config CFG] [--layers 2] [--formats bf16,int8,int4] [--write]

Builds the model with random weights for each format, runs a prompt of 64 tokens and a few decode
steps (eager: the shapes the captured step launches), then prints {device: {kernel: [(key, (kwargs,
num_warps, num_stages))]}}. Run it with empty caches (XDG_CACHE_HOME pointing at a new folder), so
that every choice is made here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ernie_cli.kernels.triton import gemv, grouped
from ernie_cli.model.config import parse_config
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.weights.loader import prepare_for_decoding, random_model

CONFIG = Path(__file__).resolve().parent / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json"
CHOICES = Path(__file__).resolve().parents[1] / "ernie_cli" / "kernels" / "triton" / "choices.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--write", action="store_true", help="merge this card's choices into the package's choices.json")
    args = ap.parse_args()
    raw = json.loads(args.config.read_text())
    raw.update(num_hidden_layers=args.layers, moe_layer_end_index=args.layers - 1)
    cfg = parse_config(raw)
    for fmt in args.formats.split(","):
        spec = None if fmt == "bf16" else QuantSpec.make(fmt)
        model = prepare_for_decoding(random_model(cfg, "cuda", torch.bfloat16, quantize=spec), "graph")
        decoder = Decoder(model, "eager")
        ids = torch.randint(3, 1000, (1, 80), device="cuda")
        with torch.inference_mode():
            decoder.reserve(80)
            decoder.prefill(ids[:, :64])
            for pos in range(64, 68):
                decoder(ids[:, pos : pos + 1], torch.tensor([pos], device="cuda"))  # the graph's form: a tensor position
        del model, decoder
        torch.cuda.empty_cache()
    tuners = {"_gemv": gemv._gemv, "_gemv_dp4a": gemv._gemv_dp4a, "_grouped": grouped._grouped}
    out = {name: [[list(k), [c.kwargs, c.num_warps, c.num_stages]] for k, c in t.cache.items()] for name, t in tuners.items()}
    entry = {torch.cuda.get_device_name(): out}
    print(json.dumps(entry))
    if args.write:
        table = json.loads(CHOICES.read_text()) if CHOICES.is_file() else {}
        table.update(entry)
        tmp = CHOICES.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(CHOICES)


if __name__ == "__main__":
    main()
