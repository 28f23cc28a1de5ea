"""Speed and memory measurements in the manner of llama.cpp's llama-bench.

Tests (each at an optional depth D: D tokens already in the KV cache):
- ppP: prefill P prompt tokens in one forward;          tok/s = P / time
- tgN: decode N tokens one at a time after the prompt;  tok/s = N / time
- pgP,N: prefill P then decode N;                        tok/s = (P + N) / time
Inputs are synthetic token ids drawn before timing; nothing is tokenized or sampled inside the timed
region (decode steps feed the next pre-drawn id, not a sampled one). Each test runs once to warm
up, then `repetitions` times.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ernie_cli.config import ErnieConfig
from ernie_cli.generate import Decoder
from ernie_cli.model import Experts, ErnieForCausalLM


@dataclass(frozen=True)
class BenchCase:
    prompt: int  # tokens prefilled (timed)
    generate: int  # tokens decoded (timed)
    depth: int = 0  # tokens already in the cache (untimed)

    @property
    def name(self) -> str:
        if self.prompt and self.generate:
            base = f"pp{self.prompt}+tg{self.generate}"
        elif self.prompt:
            base = f"pp{self.prompt}"
        else:
            base = f"tg{self.generate}"
        return base + (f" @ d{self.depth}" if self.depth else "")

    @property
    def tokens(self) -> int:
        return self.prompt + self.generate


def build_tests(prompts: list[int], generates: list[int], pairs: list[tuple[int, int]], depths: list[int]) -> list[BenchCase]:
    """Every combination, like llama-bench: each -p alone, each -n alone, each --pg pair, at each depth."""
    tests = []
    for d in depths:
        tests += [BenchCase(p, 0, d) for p in prompts if p > 0]
        tests += [BenchCase(0, n, d) for n in generates if n > 0]
        tests += [BenchCase(p, n, d) for p, n in pairs]
    return tests


@dataclass
class CaseResult:
    test: str
    prompt_tokens: int
    gen_tokens: int
    depth: int
    samples_s: list[float]  # wall time of each repetition
    ttft_s: list[float]  # time to first new token's logits of each repetition
    peak_memory_bytes: int
    tokens_per_s: list[float] = field(default_factory=list)
    mean_tokens_per_s: float = 0.0
    std_tokens_per_s: float = 0.0
    median_ttft_ms: float = 0.0
    weight_bytes_per_token: int = 0
    bandwidth_gb_s: float | None = None

    def finish(self, tokens: int, bytes_per_token: int) -> "CaseResult":
        self.tokens_per_s = [tokens / s for s in self.samples_s]
        self.mean_tokens_per_s = statistics.fmean(self.tokens_per_s)
        self.std_tokens_per_s = statistics.stdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0
        self.median_ttft_ms = statistics.median(self.ttft_s) * 1000
        self.weight_bytes_per_token = bytes_per_token
        if self.gen_tokens and not self.prompt_tokens:  # bandwidth only means something for pure decode
            self.bandwidth_gb_s = bytes_per_token * self.mean_tokens_per_s / 1e9
        return self


# ---- what one decoded token reads ------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes_per_token(model: ErnieForCausalLM) -> int:
    """Bytes of weights one decode step reads: everything but the unselected experts and the
    embedding table (one row is looked up), plus the whole head matrix (tied or not).

    A stack of n experts is read for k of its E routed experts and for every expert beyond E: the
    shared experts that the CUDA decode graph moves into the stack (fuse.shared_into_experts)
    are read by every token, as they were as a separate MLP."""
    cfg = model.config
    expert_prefixes = tuple(
        name + "." for name, m in model.named_modules() if isinstance(m, Experts)
    )

    def share(t: torch.Tensor) -> float:
        n = t.shape[0] if t.dim() else 0
        if n < cfg.num_experts:  # not stacked by expert
            return cfg.num_experts_per_tok / cfg.num_experts
        return (cfg.num_experts_per_tok + n - cfg.num_experts) / n

    total = 0.0
    state = model.state_dict()  # persistent tensors only: no KV cache, no RoPE table
    for name, t in state.items():
        if name.startswith("embed_tokens."):
            if cfg.tie_word_embeddings:
                total += _tensor_bytes(t)  # read whole as the head
            continue
        total += _tensor_bytes(t) * (share(t) if name.startswith(expert_prefixes) else 1.0)
    return int(total)


# ---- timing ------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def _run_once(decoder: Decoder, spec: BenchCase, ids: torch.Tensor, clock: _Clock) -> tuple[float, float]:
    """One repetition: returns (timed seconds, seconds to the first new token)."""
    model = decoder.model
    cache = decoder.reserve(spec.depth + max(spec.prompt, 1) + spec.generate + 1)
    pos = 0
    if spec.depth:
        model(ids[:, : spec.depth], 0, cache, last=spec.depth - 1)
        pos = spec.depth
    if not spec.prompt:  # a decode-only test still needs one token in place before the first step
        model(ids[:, pos : pos + 1], pos, cache)
        pos += 1
    start = clock.now()
    first = None
    if spec.prompt:
        decoder.prefill(ids[:, pos : pos + spec.prompt], pos)
        pos += spec.prompt
        first = clock.now() - start
    for _ in range(spec.generate):
        decoder(ids[:, pos : pos + 1], pos)
        pos += 1
        if first is None:
            first = clock.now() - start
    return clock.now() - start, first


def run_test(model: ErnieForCausalLM, spec: BenchCase, repetitions: int, seed: int = 0, progress=None, decoder: Decoder | None = None) -> CaseResult:
    device = model.device
    decoder = decoder or Decoder(model)
    clock = _Clock(device)
    gen = torch.Generator().manual_seed(seed)
    n = spec.depth + max(spec.prompt, 1) + spec.generate + 1
    ids = torch.randint(3, min(model.config.vocab_size, 100_000), (1, n), generator=gen).to(device)
    _run_once(decoder, spec, ids, clock)  # warm-up: allocations, kernel selection, caches
    _reset_peak(device)
    samples, ttfts = [], []
    for r in range(repetitions):
        if progress:
            progress(spec, r)
        seconds, first = _run_once(decoder, spec, ids, clock)
        samples.append(seconds)
        ttfts.append(first)
    result = CaseResult(spec.name, spec.prompt, spec.generate, spec.depth, samples, ttfts, _peak(device))
    return result.finish(spec.tokens, weight_bytes_per_token(model))


# ---- the run's context -------------------------------------------------------------------------------


def git_commit(here: Path | None = None) -> str | None:
    """The checkout's commit, with "-dirty" where tracked files differ from it, so a figure names
    the code that made it. None where this package is not tracked by the repository around it (a
    virtual environment inside someone else's project would otherwise report their commit)."""
    here = here or Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", "--", "bench.py")
    head = git("rev-parse", "--short=12", "HEAD")
    if not (tracked and tracked.returncode == 0 and head and head.returncode == 0 and head.stdout.strip()):
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head.stdout.strip() + ("-dirty" if status and status.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run_context(model: ErnieForCausalLM, model_name: str, size_on_disk: int | None, quantization: str | None) -> dict:
    cfg: ErnieConfig = model.config
    device = model.device
    counts = cfg.parameter_counts()
    return {
        "model": model_name,
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "size_on_disk_bytes": size_on_disk,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "weight_bytes_in_memory": sum(_tensor_bytes(t) for t in model.state_dict().values()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": quantization or "none",
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
    }


def result_row(context: dict, result: CaseResult) -> dict:
    return {**context, **asdict(result)}
