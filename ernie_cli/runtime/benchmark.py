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

from ernie_cli.console import warn
from ernie_cli.errors import ErnieError, UsageError
from ernie_cli.model.cache import CACHE_BLOCK
from ernie_cli.model.config import ErnieConfig
from ernie_cli.model.ernie import ErnieForCausalLM, Experts
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.weights.loader import activation_bytes, available_bytes, kv_cache_bytes, proc_bytes


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

    @property
    def positions(self) -> int:
        """Positions the test fills: the depth, the prompt (one token before a decode-only test's
        first step), then one per decode step."""
        return self.depth + max(self.prompt, 1) + self.generate


def build_tests(prompts: list[int], generates: list[int], pairs: list[tuple[int, int]], depths: list[int]) -> list[BenchCase]:
    """Every combination, like llama-bench: each -p alone, each -n alone, each --pg pair, at each depth."""
    tests = []
    for d in depths:
        tests += [BenchCase(p, 0, d) for p in prompts if p > 0]
        tests += [BenchCase(0, n, d) for n in generates if n > 0]
        tests += [BenchCase(p, n, d) for p, n in pairs]
    return tests


def check_sizes(prompts: list[int], generates: list[int], pairs: list[tuple[int, int]], depths: list[int], context: int) -> None:
    """A usage error for a size that no test can hold in a context of `context` positions, at any depth."""
    def refuse(option: str, value: str, most: int, why: str = "") -> UsageError:
        return UsageError(
            f"{option} {value} is more than the model's context of {context} positions can ever hold{why}: use at most {most}."
        )

    for p in prompts:
        if p > context:
            raise refuse("-p", str(p), context)
    for n in generates:
        if n + 1 > context:
            raise refuse("-n", str(n), context - 1, " (a decode test starts after one prompt token)")
    for p, n in pairs:
        if p + n > context:
            raise refuse("--pg", f"{p},{n}", context, " (prompt and generated tokens together)")
    for d in depths:
        if d >= context:
            raise refuse("-d", str(d), context - 1, " with a test after it")


def plan_tests(prompts: list[int], generates: list[int], pairs: list[tuple[int, int]], depths: list[int], context: int) -> list[BenchCase]:
    """build_tests, less those past a context of `context` positions, which are named in one warning.

    A size no depth can make fit is a usage error (check_sizes), and so is a sweep none of whose
    combinations fits; a combination alone past the context is skipped, so one sweep can span
    several depths."""
    check_sizes(prompts, generates, pairs, depths, context)
    tests = build_tests(prompts, generates, pairs, depths)
    kept = [t for t in tests if t.positions <= context]
    skipped = ", ".join(t.name for t in tests if t.positions > context)
    if not kept:
        raise UsageError(f"no test fits in the model's context of {context} positions ({skipped}): lower -d, -p, -n or --pg.")
    if skipped:
        warn(f"skipping {skipped}: past the model's context of {context} positions.")
    return kept


# ---- memory ------------------------------------------------------------------------------------------


def case_bytes(cfg: ErnieConfig, spec: BenchCase, dtype: torch.dtype, cache_capacity: int = 0) -> int:
    """Memory a test needs beside the weights: its KV cache (none where a cache of `cache_capacity`
    positions is kept, see Decoder.reserve) and RoPE tables at the capacity a KVCache
    rounds to, its token ids, and the larger of the untimed depth fill's and the timed forward's
    activations."""
    slots = spec.positions + 1
    capacity = -(-slots // CACHE_BLOCK) * CACHE_BLOCK
    cache = 0 if cache_capacity >= slots else kv_cache_bytes(cfg, capacity, dtype) + 2 * 4 * capacity * cfg.head_dim
    fill = activation_bytes(cfg, spec.depth, spec.depth, dtype) if spec.depth else 0
    step = max(spec.prompt, 1)
    return cache + 8 * slots + max(fill, activation_bytes(cfg, step, spec.depth + step, dtype))


def free_bytes(device: torch.device) -> int:
    """Free memory, counting on CUDA the blocks torch holds cached but unused (it reuses them first)."""
    free = available_bytes(device)
    if device.type == "cuda":
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free


def check_memory(cfg: ErnieConfig, tests: list[BenchCase], dtype: torch.dtype, device: torch.device, free: int | None = None,
                 cache_capacity: int = 0, held: int = 0) -> None:
    """Refuse (ErnieError, exit 1) the first test that would not fit, saying what would: the caller
    learns it in a second instead of from the out-of-memory killer. held: bytes of a KV cache that
    a larger one replaces, freed as it is."""
    free = free_bytes(device) if free is None else free
    for spec in tests:
        need = case_bytes(cfg, spec, dtype, cache_capacity)
        room = free + (held if cache_capacity < spec.positions + 1 else 0)
        if need > room:
            gib = 1024**3
            raise ErnieError(
                f"{spec.name} needs about {need / gib:.1f} GiB for its KV cache and activations but only "
                f"{room / gib:.1f} GiB is free on {device}: {_what_fits(cfg, spec, dtype, room)}"
            )


def _what_fits(cfg: ErnieConfig, spec: BenchCase, dtype: torch.dtype, free: int) -> str:
    """The largest test of the same kind at the same depth that fits in `free` bytes, as options."""
    if spec.prompt:
        make, most, option = (lambda x: BenchCase(x, spec.generate, spec.depth)), spec.prompt, "-p {}"
        if spec.generate:
            option = f"--pg {{}},{spec.generate}"
    else:
        make, most, option = (lambda x: BenchCase(0, x, spec.depth)), spec.generate, "-n {}"
    lo, hi = 0, most  # the largest x with make(x) fitting lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if case_bytes(cfg, make(mid), dtype) <= free else (lo, mid)
    at = f" at depth {spec.depth}" if spec.depth else ""
    if lo == 0:
        return f"not even one token fits{at}; lower -d, or use a quantized model or a device with more memory."
    return f"at most {option.format(lo)} fits{at}; lower the size, or use a quantized model or a device with more memory."


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
    found = proc_bytes("/proc/self/status", "VmHWM")
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def _run_once(decoder: Decoder, spec: BenchCase, ids: torch.Tensor, clock: _Clock) -> tuple[float, float]:
    """One repetition: returns (timed seconds, seconds to the first new token)."""
    decoder.reserve(spec.positions + 1)
    pos = 0
    if spec.depth:
        decoder.fill(ids[:, : spec.depth], 0)
        pos = spec.depth
    if not spec.prompt:  # a decode-only test still needs one token in place before the first step
        decoder.fill(ids[:, pos : pos + 1], pos)
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
    cache = decoder.cache
    capacity = cache.capacity if cache is not None else 0
    held = sum(_tensor_bytes(t) for t in cache.buffers()) if cache is not None else 0
    check_memory(model.config, [spec], model.dtype, device, cache_capacity=capacity, held=held)
    clock = _Clock(device)
    gen = torch.Generator().manual_seed(seed)
    n = spec.positions + 1
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
