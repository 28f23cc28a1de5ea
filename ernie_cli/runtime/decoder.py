"""The model run over one sequence on a device: the KV cache it owns, the one-token step (eager,
captured as one CUDA graph, or compiled by Inductor into one) and the prompt's forward (a CUDA
graph per padded length where the step is compiled)."""

from __future__ import annotations

import os
import weakref

import torch

from ernie_cli.cachedir import set_compiler_cache_env
from ernie_cli.console import warn
from ernie_cli.errors import deferred_interrupts
from ernie_cli.kernels import ops
from ernie_cli.model.cache import KVCache
from ernie_cli.model.ernie import ErnieForCausalLM, MoE


def step_mode(option: str, device: torch.device) -> str:
    """--compile auto|graph|on|off -> "graph", "compile" or "eager".

    On CUDA, auto is "graph": the eager step's kernels (Triton, cuBLAS and a few torch ops, static
    shapes, no host sync) captured as one CUDA graph, with no Dynamo or Inductor, which spend
    seconds before the second token even with their caches warm; and per token the captured step is
    also the faster, in every format (docs/performance.md), so `ernie bench`'s steady rates take it
    too. On the CPU there are no graphs, and compiling is not won back."""
    if device.type != "cuda":
        return "compile" if option == "on" else "eager"
    return {"auto": "graph", "graph": "graph", "on": "compile", "off": "eager"}[option]


def _compile_settings() -> None:
    set_compiler_cache_env()  # before Inductor reads it: a second `ernie complete` does not recompile
    with deferred_interrupts():
        import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    inductor.assert_indirect_indexing = False  # the expert gather is bounded by top-k; skip device asserts


def prefill_waits_for_host(model: ErnieForCausalLM) -> bool:
    """Whether a prompt's forward reads anything back to the host, so that no CUDA graph can hold it."""
    stacks = [(layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj) for layer in model.layers if isinstance(layer.mlp, MoE)]
    return ops.prefill_waits_for_host(model.device, model.dtype, stacks)


def capture_graph(fn, device: torch.device, pool=None):
    """fn() run twice on a side stream (Triton compiles and tunes, cuBLAS sets up: none of it may
    happen inside a capture), then captured: (graph, fn's output inside the graph's memory)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


class StepGraph:
    """The eager one-token step, captured once per KV cache as one CUDA graph: no Dynamo, no
    Inductor, nothing compiled but the Triton kernels the eager step launches anyway (kept in
    Triton's cache between runs). The token and position are read from device buffers, so a replay
    needs no host value; the graph writes into the cache it was captured with, so a new cache
    means a new capture."""

    def __init__(self, model: ErnieForCausalLM):
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self._cache = lambda: None  # a weak reference: the graph never keeps an old cache alive
        self.tokens = self.pos = self.logits = None

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        if self._cache() is not cache or self.tokens.shape != tokens.shape:
            self.graph = None  # the old graph's memory goes before the new capture takes its own
            device = self.model.device
            self.tokens = tokens.detach().clone()
            self.pos = torch.full((1,), pos, dtype=torch.long, device=device)
            self.graph, self.logits = capture_graph(lambda: self.model(self.tokens, self.pos, cache)[:, -1], device)
            self._cache = weakref.ref(cache)
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is reused by the next replay


class PrefillGraphs:
    """A prompt's forward from position 0, replayed as a CUDA graph captured per padded length.

    Why: an eager prefill of the full model queues about 1,100 kernels, and for a few hundred tokens
    Python queueing them takes longer than the GPU running them (docs/performance.md). A graph
    replays them with one launch (where nothing in the forward waits for the host:
    ops.prefill_waits_for_host). Its shapes are fixed, so a prompt is padded at its end to the next
    length in LENGTHS; longer prompts
    run eagerly. A length's graph is captured on first use (two eager runs first, so Triton tunes
    and cuBLAS sets up outside the capture), and all are dropped when the KV cache is replaced,
    since a graph writes into the cache it was captured with. All graphs share one memory pool; they
    run one at a time, and each result is copied out before the next replay.

    The padding is exact: attention is causal and every other operation is per token, so nothing
    before the padding changes; it fills cache slots past the prompt, which decoding overwrites
    before it reads them.

    capture=False runs the same padded forward eagerly: the CPU has no graphs, and its tests check
    the padding through it."""

    # Steps of at most 1.5x past 256 tokens, so padding adds at most half a prompt's work.
    LENGTHS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)

    def __init__(self, model: ErnieForCausalLM, capture: bool = True):
        self.model, self.capture = model, capture
        self.graphs: dict[int, tuple] = {}
        self.failed = False  # a capture failed: every prompt runs eagerly from then on
        self._cache = lambda: None  # the KV cache the graphs write into (a weak reference: never held twice)
        self.pool = None

    def length_for(self, t: int) -> int | None:
        return next((n for n in self.LENGTHS if n >= t), None)

    @torch.inference_mode()  # the graph's input buffers are inference tensors, written in place
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [1, T] with T <= LENGTHS[-1], at positions 0..T-1 -> logits [1, V] at T-1. The
        cache must hold length_for(T) positions."""
        model, t = self.model, tokens.shape[1]
        n = self.length_for(t)
        if not self.capture:
            padded = torch.zeros((1, n), dtype=tokens.dtype, device=tokens.device)
            padded[:, :t] = tokens
            return model(padded, 0, cache, last=torch.tensor([t - 1], device=tokens.device))[:, -1]
        if self._cache() is not cache:  # every graph writes into its cache: drop them all
            self.graphs.clear()
            # and their pool with them: torch frees a pool whose last graph is gone, and capturing into
            # the freed pool's handle again fails an assertion in its allocator.
            self.pool = None
            self._cache = weakref.ref(cache)
        if n not in self.graphs:
            try:
                self.graphs[n] = self._capture(n, cache)
            except RuntimeError as e:  # something waited for the host after all: stay correct, say so
                if os.environ.get("ERNIE_DEBUG") == "1":
                    raise
                warn(f"the prefill could not be captured as a CUDA graph ({str(e).splitlines()[0]}); prompts run eagerly.")
                self.failed = True
                return model(tokens, 0, cache, last=t - 1)[:, -1]
        graph, padded, last, logits = self.graphs[n]
        padded.zero_()
        padded[:, :t] = tokens
        last.fill_(t - 1)
        graph.replay()
        return logits.clone()

    def _capture(self, n: int, cache: KVCache) -> tuple:
        model, device = self.model, self.model.device
        padded = torch.zeros((1, n), dtype=torch.long, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, logits = capture_graph(lambda: model(padded, 0, cache, last=last)[:, -1], device, self.pool)
        return graph, padded, last, logits


def prompt_graphs(model: ErnieForCausalLM) -> PrefillGraphs | None:
    """Prompts replayed as CUDA graphs, for runs of many prompts (a benchmark, the compiled mode),
    where capturing a length once pays back; None where there are no graphs, or where the forward
    waits for the host."""
    if model.device.type != "cuda" or prefill_waits_for_host(model):
        return None
    return PrefillGraphs(model)


class Decoder:
    """Runs the model over one sequence: owns its KV cache and the one-token step, in one of three
    modes (step_mode): "eager"; "graph", the eager step captured as one CUDA graph (StepGraph);
    "compile", the step compiled by Inductor into one CUDA graph, where the prompt's forward
    also replays a CUDA graph (PrefillGraphs), which pays back only over many prompts. It never
    changes the model: the loader made every fusion first."""

    def __init__(self, model: ErnieForCausalLM, mode: str = "eager", prefill_graphs: PrefillGraphs | None = None):
        if mode not in ("eager", "graph", "compile"):
            raise ValueError(f"unknown step mode {mode!r}")
        if mode == "graph" and model.device.type != "cuda":
            mode = "eager"  # no graphs off CUDA
        self.model, self.mode = model, mode
        self.prefill_graphs = prefill_graphs
        self.cache: KVCache | None = None
        self.graph = StepGraph(model) if mode == "graph" else None
        if mode == "compile":
            _compile_settings()
            # CUDA: the step as one CUDA graph; the CPU has none, and there compiling fuses the small ops.
            kind = "reduce-overhead" if model.device.type == "cuda" else "default"
            self.step = torch.compile(self._step, mode=kind, fullgraph=True)
            self.pos = torch.zeros(1, dtype=torch.long, device=model.device)
            self.prefill_graphs = prefill_graphs or prompt_graphs(model)

    @property
    def compiled(self) -> bool:
        return self.mode == "compile"

    def reserve(self, positions: int, batch: int = 1) -> KVCache:
        """A cache for `positions`: the one held where it is big enough, so a captured step keeps its shapes."""
        if self.cache is None or not self.cache.holds(batch, positions, self.model.dtype):
            self.cache = None  # freed before the new one is made: never two caches at once
            self.cache = self.model.new_cache(batch, positions)
            if self.mode == "compile" and self.model.device.type == "cuda":
                self.cache.mark_static()
        return self.cache

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, pos, self.cache)[:, -1]

    def prefill(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> logits [B, V] at the last."""
        graphs = self.prefill_graphs
        n = graphs.length_for(tokens.shape[1]) if graphs is not None else None
        if graphs is not None and not graphs.failed and start == 0 and tokens.shape[0] == 1 and n:
            return graphs(tokens, self.reserve(n))
        self.reserve(start + tokens.shape[1], tokens.shape[0])
        return self.model(tokens, start, self.cache, last=tokens.shape[1] - 1)[:, -1]

    def fill(self, tokens: torch.Tensor, start: int = 0) -> None:
        """tokens [B, T] into the held cache at positions start..start+T-1, eagerly, their logits
        unused (the context a benchmark does not time)."""
        self.model(tokens, start, self.cache, last=tokens.shape[1] - 1)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [B, 1] at position pos -> logits [B, V]."""
        if self.mode == "graph":
            try:
                return self.graph(tokens, pos, self.cache)
            except RuntimeError as e:  # something in the step waited for the host: stay correct, say so
                if os.environ.get("ERNIE_DEBUG") == "1":
                    raise
                warn(f"the decode step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); it runs eagerly.")
                self.mode, self.graph = "eager", None
        if self.mode == "eager":
            return self.model(tokens, pos, self.cache)[:, -1]
        self.pos.fill_(pos)
        return self.step(tokens, self.pos).clone()  # the graph's output buffer is reused by the next replay
