"""`ernie bench`: schema, arithmetic and formats on tiny models. No test asserts a speed."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ernie_cli.model.config import parse_config
from ernie_cli.model.ernie import MoE
from ernie_cli.runtime.benchmark import (
    BenchCase,
    build_tests,
    run_test,
    weight_bytes_per_token,
)
from ernie_cli.weights.fuse import shared_into_experts
from ernie_cli.weights.loader import load_model, random_model

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

    from ernie_cli.runtime import benchmark as bench

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


# ---- sizes: the context and memory are checked before anything big is allocated ----------------------

SHORT_CONTEXT = 256


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A tiny dense model whose context holds SHORT_CONTEXT positions."""
    from tiny_models import write_checkpoint

    path, _ = write_checkpoint(tmp_path_factory.mktemp("short") / "ckpt", "dense", max_position_embeddings=SHORT_CONTEXT)
    return path


def bench_bounded(*args, limit_bytes=4 * 1024**3, timeout=120):
    """`ernie bench` under an address-space limit (so a run that grows cannot take the machine with
    it) -> (exit code, stdout, stderr, the peak resident set of that process alone)."""
    import resource
    import threading

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    with subprocess.Popen([sys.executable, "-m", "ernie_cli", "bench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=ENV, preexec_fn=limit) as proc:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        out, err = proc.stdout.read(), proc.stderr.read()  # a few lines each: no pipe fills
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out.decode(), err.decode(), usage.ru_maxrss * 1024


def test_more_tokens_than_the_context_holds_is_a_usage_error(short_model):
    code, out, err, peak = bench_bounded("-m", str(short_model), "-p", "99999999", "-n", "0", "-r", "1")
    assert code == 2, err
    assert "-p 99999999" in err and f"{SHORT_CONTEXT}" in err and "Traceback" not in err
    assert out == ""
    assert peak < 1.5 * 1024**3  # the interpreter and torch: nothing sized by the request


@pytest.mark.parametrize("args, named", [
    (["-p", str(SHORT_CONTEXT + 1), "-n", "4"], "-p"),
    (["-p", "8", "-n", str(SHORT_CONTEXT)], "-n"),  # a decode test puts one token in place first: N + 1 positions
    (["-p", "8", "-n", "4", "-d", str(SHORT_CONTEXT)], "-d"),  # nothing fits after a full cache
    (["-p", "8", "-n", "4", "--pg", f"{SHORT_CONTEXT - 10},11"], "--pg"),
    (["-p", "200", "-n", "0", "-d", "100"], "no test fits"),  # each alone fits; every combination is past the context
])
def test_sizes_no_context_can_hold_exit_2(short_model, args, named):
    proc = bench("-m", str(short_model), "-r", "1", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and named in err and str(SHORT_CONTEXT) in err, err


def test_tests_past_the_context_are_skipped_with_a_warning(short_model):
    proc = bench("-m", str(short_model), "-p", f"8,{SHORT_CONTEXT}", "-n", "4", "-d", "0,100", "-r", "1", "-o", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    # By hand: positions = depth + max(P, 1) + N; pp256 fills the context exactly, pp256 @ d100 needs 356.
    assert [r["test"] for r in json.loads(proc.stdout)] == ["pp8", f"pp{SHORT_CONTEXT}", "tg4", "pp8 @ d100", "tg4 @ d100"]
    warnings = [l for l in proc.stderr.decode().splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and f"pp{SHORT_CONTEXT} @ d100" in warnings[0] and str(SHORT_CONTEXT) in warnings[0]


def test_a_test_larger_than_memory_is_refused_before_loading(short_model, tmp_path):
    """A context that allows it, a machine that cannot hold it: exit 1, saying what would fit."""
    from tiny_models import edit_config

    huge = tmp_path / "huge"
    shutil.copytree(short_model, huge)
    edit_config(huge, max_position_embeddings=2**40)
    tokens = 10**12  # the KV cache alone, by hand: 2 (k, v) * 4 layers * 2 heads * 16 * 4 bytes = 1 KiB a token
    code, out, err, peak = bench_bounded("-m", str(huge), "-p", str(tokens), "-n", "0", "-r", "1")
    assert code == 1, err
    assert f"pp{tokens}" in err and "Traceback" not in err and out == ""
    fits = int(re.search(r"at most -p (\d+)", err).group(1))
    free = _mem_available()
    assert 0 < fits and fits * 1024 <= free  # the cache alone of what it offers fits in free memory
    assert peak < 1.5 * 1024**3


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


@pytest.mark.parametrize("args, named", [
    (["-r", "0"], "-r"),
    (["-r", "100000000"], "-r"),
    (["-t", "0"], "-t"),
    (["-t", "100000000"], "-t"),
    (["-p", "-5"], "-p"),
    (["-n", "1,x"], "-n"),
    (["-d", "1.5"], "-d"),
    (["--pg", "4,0"], "--pg"),
    (["--layers", "0"], "--layers"),
    (["--layers", "1000000000"], "--layers"),
    (["--dtype", "int3"], "--dtype"),
])
def test_option_values_are_checked_before_loading(args, named):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ernie_cli", "bench", "--config", str(FULL_CONFIG), *args], capture_output=True,
                          env=ENV, timeout=120, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and named in err and "Traceback" not in err, err
    assert time.monotonic() - start < 60  # refused, not run: a full-size random model would take minutes


MEASURE_PREFILL = """
import sys, torch
from ernie_cli.runtime.benchmark import _peak, _reset_peak
from ernie_cli.weights.loader import activation_bytes, load_model
model = load_model(sys.argv[1], "cpu", torch.float32)
cpu = torch.device("cpu")
for tokens, depth in ((4000, 0), (2048, 1024)):
    cache = model.new_cache(1, tokens + depth)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens + depth))
    with torch.inference_mode():
        if depth:
            model(ids[:, :depth], 0, cache, last=-1)
        base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
        _reset_peak(cpu)
        model(ids[:, depth:], depth, cache, last=-1)
        print(tokens, depth, _peak(cpu) - base, activation_bytes(model.config, tokens, tokens + depth, torch.float32))
"""


@pytest.mark.parametrize("shape", ["moe", "dense"])
def test_activation_estimate_covers_a_measured_prefill(checkpoints, shape):
    """The estimate against the peak resident set a prefill really adds (/proc/self/status). With
    a fixed mmap threshold every large block is fresh memory, so the peak is not hidden by blocks
    an earlier forward freed."""
    path, _ = checkpoints(shape)
    env = dict(ENV, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", MEASURE_PREFILL, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():
        tokens, depth, used, estimate = map(int, line.split())
        assert used > 1_000_000, line  # the measurement saw the forward at all
        assert estimate >= used, line
