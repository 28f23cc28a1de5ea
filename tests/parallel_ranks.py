"""One rank of a tensor-parallel run on the CPU (gloo), started by tests/test_parallel.py in a
process of its own. Every rank computes the forwards that need no leader; then rank 0 generates
through the lockstep Leader while the others follow, and rank 0 saves what it saw."""

from __future__ import annotations

from pathlib import Path

import torch

from ernie_cli.model.config import load_config
from ernie_cli.parallel import group as parallel
from ernie_cli.parallel.lockstep import Leader, follow
from ernie_cli.parallel.shard import plan_shard
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.runtime.generate import generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.weights.loader import load_model

PENALTY = 1.3  # tiny tied models repeat one token under plain greedy decoding; this varies them


def run(rank: int, world: int, init: str, jobs: list[tuple[str, str]], prompt: list[list[int]], new_tokens: int, out: str) -> None:
    torch.set_num_threads(1)
    group = parallel.join(rank, world, init, torch.device("cpu"))
    ids = torch.tensor(prompt)
    try:
        for name, path in jobs:
            model = load_model(Path(path), "cpu", torch.float32, shard=plan_shard(load_config(Path(path)), group))
            with torch.inference_mode():
                full = model(ids)
                cache = model.new_cache(1, ids.shape[1])
                steps = [model(ids[:1, :8], 0, cache), model(ids[:1, 8:13], 8, cache)]  # a prompt, then a chunk
                steps += [model(ids[:1, p : p + 1], p, cache) for p in range(13, ids.shape[1])]  # then one token at a time
            decoder = Decoder(model)
            if rank == 0:
                leader = Leader(decoder)
                sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=PENALTY), model.config.vocab_size, model.device)
                tokens = [s.token for s in generate(model, ids[0].tolist(), new_tokens, sampler, decoder=leader)]
                leader.stop()
                held = sum(p.numel() for p in model.parameters())
                torch.save({"full": full, "incremental": torch.cat(steps, 1), "tokens": tokens, "parameters": held}, Path(out) / f"{name}.pt")
            else:
                follow(decoder)
    finally:
        parallel.leave()
