"""transformers' own speed on the same shape, for the ratio in docs/performance.md.

Usage: python benchmarks/hf_baseline.py CONFIG.json --experts eager|grouped_mm [--layers N] [-p 512] [-n 128] [-r 3]
Builds Ernie4_5_MoeForCausalLM from the config with random bf16 weights directly on the GPU (meta
device, then to_empty), then times a 512-token prefill (logits of the last position only) and 128
one-token decode steps through its DynamicCache, synchronising around each timed region. Prints
one JSON line per test with the median of the repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--experts", default="grouped_mm")
    ap.add_argument("--layers", type=int)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import transformers
    from transformers import DynamicCache, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    raw = json.load(open(args.config))
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "auto_map")}
    if args.layers:
        raw.update(num_hidden_layers=args.layers, moe_layer_end_index=args.layers - 1)
    cfg = Ernie4_5_MoeConfig(**raw)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = args.experts
    dev = torch.device(args.device)
    with torch.device("meta"):
        model = Ernie4_5_MoeForCausalLM(cfg).to(torch.bfloat16)  # bf16 before memory exists: fp32 would not fit 80 GB
    model = model.to_empty(device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "e_score_correction_bias" in name:
                p.zero_()
            else:
                p.normal_(0, 0.02)
        for name, m in model.named_modules():  # keep the router in fp32 as transformers loads it
            if name.endswith("mlp.gate"):
                m.float()
    model.eval()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    ids = torch.randint(3, 100000, (1, args.p + args.n + 1), device=dev)

    def prefill():
        cache = DynamicCache(config=cfg)
        sync(); t = time.perf_counter()
        with torch.no_grad():
            model(ids[:, : args.p], past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(); return time.perf_counter() - t

    def decode():
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            model(ids[:, :1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(); t = time.perf_counter()
            for i in range(1, args.n + 1):
                model(ids[:, i : i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(); return time.perf_counter() - t

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    for test, fn, tokens in (("pp%d" % args.p, prefill, args.p), ("tg%d" % args.n, decode, args.n)):
        fn()  # warm-up
        times = [fn() for _ in range(args.r)]
        print(json.dumps({"engine": f"transformers {transformers.__version__} ({args.experts})", "device": name,
                          "test": test, "median_tokens_per_s": tokens / statistics.median(times),
                          "samples_s": times, "layers": cfg.num_hidden_layers}), flush=True)


if __name__ == "__main__":
    main()
