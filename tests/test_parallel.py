"""Tensor and expert parallelism on the CPU: 2, 3 and 4 gloo processes against transformers' eager
float32 forward and greedy generate, and against this runtime in one process.

The shapes include splits that do not divide: 4 query heads over 3 ranks (2, 1, 1), 8 over 3
(3, 3, 2, one rank's heads straddling two GQA groups), 2 key/value heads over 3 or 4 ranks (held by
several), 8 and 7 experts over 3 and 4 ranks, MLP widths of 160 and 48 over 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import write_full_vocab_checkpoint

from ernie_cli.parallel.group import Group
from ernie_cli.parallel.shard import kv_heads_for, part, plan_shard
from ernie_cli.runtime.generate import generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.weights.loader import load_model

TOL = 1e-5  # of the largest logit: float32 sums split over ranks round differently (up to 3e-6 of it seen)
NEW_TOKENS = 20
PENALTY = 1.3  # as parallel_ranks.PENALTY
JOBS = {
    2: ["moe", "dense", "moe_fused_names"],
    3: ["moe", "moe_gqa8", "dense_bias"],
    4: ["moe", "moe_gqa8", "moe_no_shared"],
}
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
ENV.pop("ERNIE_DEBUG", None)


def _prompt():
    return torch.randint(3, 500, (2, 17), generator=torch.Generator().manual_seed(3))


def _spawn(world, jobs, prompt, out, tmp_path, timeout=240):
    from parallel_ranks import run

    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.spawn(run, args=(world, init, jobs, prompt.tolist(), NEW_TOKENS, str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout} s (a collective that never met its partners)")


@pytest.mark.parametrize("world", sorted(JOBS))
def test_split_model_matches_transformers_and_one_process(checkpoints, tmp_path, world):
    names = JOBS[world]
    paths = {name: checkpoints(name) for name in names}
    prompt = _prompt()
    out = tmp_path / "out"
    out.mkdir()
    _spawn(world, [(name, str(paths[name][0])) for name in names], prompt, out, tmp_path)
    for name in names:
        path, ref = paths[name]
        got = torch.load(out / f"{name}.pt")
        one = load_model(path, "cpu", torch.float32)
        with torch.no_grad():
            expected = ref(prompt).logits
            single = one(prompt)
            theirs = ref.generate(prompt[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                  repetition_penalty=PENALTY, eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=PENALTY), one.config.vocab_size, one.device)
        ours = [s.token for s in generate(one, prompt[0].tolist(), NEW_TOKENS, sampler)]
        assert got["parameters"] < sum(p.numel() for p in one.parameters()), name  # rank 0 held a part only
        for logits in (got["full"], got["incremental"]):
            reference, one_process = expected[: logits.shape[0]], single[: logits.shape[0]]
            scale = reference.abs().max().item()
            assert (logits - reference).abs().max().item() < TOL * scale, name
            assert (logits - one_process).abs().max().item() < TOL * scale, name
        assert got["tokens"] == theirs == ours, name
        assert len(got["tokens"]) >= 16 and len(set(got["tokens"])) > 4, name


# ---- the split itself ------------------------------------------------------------------------------


def test_parts_cover_everything_once_and_differ_by_at_most_one():
    for n in range(0, 30):
        for world in range(1, 9):
            parts = [part(n, world, r) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("heads, kv", [(4, 2), (8, 2), (20, 4), (64, 8), (6, 6), (12, 1)])
def test_every_query_head_reads_its_own_kv_head(heads, kv):
    group_size = heads // kv
    for world in range(1, heads + 1):
        for rank in range(world):
            mine = part(heads, world, rank)
            held = kv_heads_for(mine, group_size)
            assert len(mine) % len(held) == 0  # GQA: each held KV head serves the same number of query heads
            run = len(mine) // len(held)
            assert [held[j // run] for j in range(len(mine))] == [h // group_size for h in mine]


def _config(**changes):
    from tiny_models import BASE, MOE

    from ernie_cli.model.config import parse_config

    return parse_config({**BASE, **MOE, **changes, "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe"})


def test_uneven_split_of_eight_heads_over_three_ranks():
    cfg = _config(num_attention_heads=8, num_key_value_heads=2, moe_num_experts=7)
    shards = [plan_shard(cfg, Group(r, 3)) for r in range(3)]
    assert [list(s.heads) for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [s.kv_heads for s in shards] == [(0,), (0, 1, 1), (1,)]
    assert [list(s.experts) for s in shards] == [[0, 1, 2], [3, 4], [5, 6]]


# ---- the commands ----------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, tokenizer_dir):
    return write_full_vocab_checkpoint(tmp_path_factory.mktemp("tp") / "tiny-ernie", tokenizer_dir)


def ernie(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "ernie_cli", *args], capture_output=True, env=ENV, timeout=timeout, stdin=subprocess.DEVNULL)


def test_complete_with_tp_prints_transformers_greedy_tokens(cli_model):
    path, ref = cli_model
    proc = ernie("complete", "-m", str(path), "--tp", "2", "--device", "cpu", "--dtype", "float32", "-t", "0",
                 "--repetition-penalty", "1.3", "-n", "16", "--json", "-q", "The capital of France is")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    record = json.loads(proc.stdout)  # one JSON object: the other rank printed nothing
    ids = torch.tensor([record["prompt_tokens"]])
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.3, eos_token_id=2, pad_token_id=0)
    assert record["tokens"] == out[0, ids.shape[1]:].tolist()


def test_bench_with_tp_runs_from_a_checkpoint_and_from_a_config(cli_model):
    path, _ = cli_model
    for source in (["-m", str(path)], ["--config", str(path / "config.json")]):
        proc = ernie("bench", *source, "--tp", "2", "--device", "cpu", "--dtype", "float32", "-p", "8", "-n", "4", "-d", "4", "-r", "1", "-o", "json")
        assert proc.returncode == 0, proc.stderr.decode()
        rows = json.loads(proc.stdout)
        assert [r["test"] for r in rows] == ["pp8 @ d4", "tg4 @ d4"]
        assert all("split over 2 ranks" in r["model"] and r["mean_tokens_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--tp", "0"], "--tp must be at least 1"),
    (["--tp", "2", "--quantize", "int8"], "drop --quantize or --tp"),
    (["--tp", "2", "--compile", "on"], "eagerly"),
    (["--tp", "2", "--device", "cuda:1"], "use --device cuda"),
])
def test_unsupported_tp_combinations_are_usage_errors(tmp_path, args, message):
    proc = ernie("complete", "-m", str(tmp_path / "no-such-model"), *args, "hi")
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_more_ranks_than_heads_is_refused_before_any_process_starts(cli_model):
    proc = ernie("complete", "-m", str(cli_model[0]), "--tp", "3", "--device", "cpu", "-n", "2", "hi")
    assert proc.returncode == 1
    assert "more ranks than the model's 2 attention heads" in proc.stderr.decode()
