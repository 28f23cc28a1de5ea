"""`ernie bench`: schema, arithmetic and formats on tiny models. No test asserts a speed."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernie_cli.fuse import shared_into_experts
from ernie_cli.bench import BenchCase, build_tests, run_test, weight_bytes_per_token
from ernie_cli.config import parse_config
from ernie_cli.loader import load_model, random_model
from ernie_cli.model import MoE

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = ROOT / "benchmarks" / "configs" / "ERNIE-4.5-21B-A3B-Base-PT.json"
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def bench(*args):
    return subprocess.run([sys.executable, "-m", "ernie_cli", "bench", *args], capture_output=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL)


def test_sweeps_run_every_combination():
    tests = build_tests([128, 512], [32], [(64, 16)], [0, 1024])
    assert [t.name for t in tests] == [
        "pp128", "pp512", "tg32", "pp64+tg16",
        "pp128 @ d1024", "pp512 @ d1024", "tg32 @ d1024", "pp64+tg16 @ d1024",
    ]
    assert build_tests([0], [0], [], [0]) == []


def test_active_parameters_against_a_hand_count():
    raw = json.loads(FULL_CONFIG.read_text())
    raw.update(hidden_size=8, intermediate_size=10, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
               head_dim=4, vocab_size=20, moe_num_experts=4, moe_k=2, moe_intermediate_size=6, moe_num_shared_experts=1,
               moe_layer_end_index=2)
    cfg = parse_config(raw)
    # By hand: attention per layer q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; norms 2*8 per layer + 8 final = 56;
    # embedding (tied head) 20*8 = 160; dense layer 0 MLP 3*8*10 = 240;
    # MoE layers 1, 2: expert 3*8*6 = 144, shared 3*8*6 = 144, router 4*8 + 4 bias = 36.
    total = 160 + 56 + 3 * 192 + 240 + 2 * (4 * 144 + 144 + 36)
    active = 160 + 56 + 3 * 192 + 240 + 2 * (2 * 144 + 144 + 36)
    assert cfg.parameter_counts() == {"total": total, "active": active}


def test_weight_bytes_per_token_by_hand(checkpoints):
    path, _ = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    cfg = model.config
    h, d, e, k, i = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    norms = (2 * cfg.num_hidden_layers + 1) * h
    moe_layer = k * 3 * h * i + 3 * h * i * cfg.num_shared_experts + e * h + e
    params = cfg.vocab_size * h + norms + cfg.num_hidden_layers * attn + 3 * h * cfg.intermediate_size + 3 * moe_layer
    assert weight_bytes_per_token(model) == params * 4
    # The CUDA decode graph moves the shared experts into the stack; every token still reads them.
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            assert shared_into_experts(layer.mlp)
    assert model.layers[1].mlp.experts.gate_up_proj.shape[0] == e + cfg.num_shared_experts
    assert weight_bytes_per_token(model) == pytest.approx(params * 4, rel=1e-12)


def test_run_test_arithmetic(checkpoints):
    path, _ = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    r = run_test(model, BenchCase(8, 0, 0), repetitions=3)
    assert len(r.samples_s) == 3 and r.tokens_per_s == [8 / s for s in r.samples_s]
    assert r.mean_tokens_per_s == pytest.approx(sum(r.tokens_per_s) / 3)
    assert r.bandwidth_gb_s is None
    g = run_test(model, BenchCase(0, 5, 16), repetitions=2)
    assert g.tokens_per_s == [5 / s for s in g.samples_s]
    assert g.bandwidth_gb_s == pytest.approx(g.weight_bytes_per_token * g.mean_tokens_per_s / 1e9)
    assert all(0 < t <= s for t, s in zip(g.ttft_s, g.samples_s))
    both = run_test(model, BenchCase(6, 3, 0), repetitions=2)
    assert both.tokens_per_s == [9 / s for s in both.samples_s]
    assert r.peak_memory_bytes > 0


def test_cli_markdown_from_model_dir(checkpoints):
    path, _ = checkpoints("moe")
    proc = bench("-m", str(path), "-p", "8,16", "-n", "4", "-r", "2", "-t", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith("| model |") and "t/s" in lines[0]
    rows = [l for l in lines[2:] if l.startswith("|")]
    assert [r.split("|")[8].strip() for r in rows] == ["pp8", "pp16", "tg4"]
    assert all(r.split("|")[5].strip() == "1" for r in rows)  # threads reported as set
    assert re.fullmatch(r"\d+\.\d\d M \(\d+\.\d\d M\)", rows[0].split("|")[3].strip())  # millions, not "0.00 B"


def test_cli_json_has_every_sample_and_field(checkpoints):
    path, _ = checkpoints("dense")
    proc = bench("-m", str(path), "-p", "8", "-n", "3", "--pg", "4,2", "-d", "0,8", "-r", "3", "-o", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = json.loads(proc.stdout)
    assert [r["test"] for r in rows] == ["pp8", "tg3", "pp4+tg2", "pp8 @ d8", "tg3 @ d8", "pp4+tg2 @ d8"]
    for r in rows:
        assert len(r["samples_s"]) == 3 and len(r["tokens_per_s"]) == 3
        tokens = r["prompt_tokens"] + r["gen_tokens"]
        assert r["tokens_per_s"] == pytest.approx([tokens / s for s in r["samples_s"]])
        for key in ("median_ttft_ms", "peak_memory_bytes", "weight_bytes_per_token", "size_on_disk_bytes", "params_total",
                    "params_active", "device_name", "torch", "dtype", "quantization", "threads"):
            assert key in r
        assert r["size_on_disk_bytes"] == (path / "model.safetensors").stat().st_size


def test_cli_csv_and_random_config(tmp_path):
    proc = bench("--config", str(FULL_CONFIG), "--layers", "2", "-p", "4", "-n", "2", "-r", "1", "-o", "csv", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = list(csv.DictReader(io.StringIO(proc.stdout.decode())))
    assert [r["test"] for r in rows] == ["pp4", "tg2"]
    assert rows[0]["layers"] == "2" and rows[0]["dtype"] == "bfloat16"
    cfg = parse_config(json.loads(FULL_CONFIG.read_text())).replace(num_hidden_layers=2, moe_layer_end_index=1)
    assert int(rows[0]["params_total"]) == cfg.parameter_counts()["total"]
    assert float(rows[1]["bandwidth_gb_s"]) == pytest.approx(
        int(rows[1]["weight_bytes_per_token"]) * float(rows[1]["mean_tokens_per_s"]) / 1e9, rel=1e-6
    )


def test_random_model_matches_config_shapes():
    cfg = parse_config(json.loads(FULL_CONFIG.read_text())).replace(
        num_hidden_layers=2, moe_layer_end_index=1, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=300, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
    )
    model = random_model(cfg, "cpu", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == cfg.parameter_counts()["total"]
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of"),
    (["--config", str(FULL_CONFIG), "-o", "xml"], "-o"),
    (["--config", str(FULL_CONFIG), "-p", "a,b"], "-p"),
    (["--config", str(FULL_CONFIG), "--pg", "5"], "--pg"),
    (["--config", str(FULL_CONFIG), "-p", "0", "-n", "0"], "no tests"),
])
def test_usage_errors(args, message):
    proc = bench(*args)
    assert proc.returncode == 2 and message in proc.stderr.decode()


def test_commit_names_the_checkout_and_says_when_it_was_changed(tmp_path):
    """Against git's own answers: the short HEAD of a repository tracking the package, "-dirty" once
    a tracked file changes, and nothing where the package sits untracked inside another repository."""
    import shutil
    import subprocess

    from ernie_cli import bench

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout.strip()

    if shutil.which("git") is None:
        pytest.skip("needs git")
    package = tmp_path / "ernie_cli"
    package.mkdir()
    shutil.copy(bench.__file__, package / "bench.py")
    git("init", "-q")
    assert bench.git_commit(package) is None  # inside a repository that does not track it
    git("add", "ernie_cli/bench.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert bench.git_commit(package) == git("rev-parse", "--short=12", "HEAD")
    (package / "bench.py").write_text("# changed\n")
    assert bench.git_commit(package) == git("rev-parse", "--short=12", "HEAD") + "-dirty"
