"""Start-up and shut-down of `ernie serve`: load the model once, size the KV pool from the memory
left, listen, run the engine, and stop cleanly on SIGTERM or Ctrl-C.

The engine (the scheduler's loop) runs on the main thread and the web side on another: on the CPU a
batch-4 step of the 3-layer int4 model took 107-138 ms driven from a second thread against 55-81 ms
from the main one (benchmarks/serve_engine_step.py --compare-thread, docs/performance.md).

Stopping: the first SIGTERM or Ctrl-C closes the listening socket, answers new requests on open
connections with 503, lets the requests in flight run for GRACE_S seconds and then ends them with
finish_reason "abort"; the process exits 0. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ernie_cli.console import info, warn
from ernie_cli.errors import ErnieError
from ernie_cli.runtime import completion
from ernie_cli.runtime.batch import BLOCK, BatchDecoder, pool_tokens
from ernie_cli.serve.app import ServeState, create_app
from ernie_cli.serve.scheduler import Scheduler
from ernie_cli.text.prompt import context_of
from ernie_cli.weights.loader import available_bytes

GRACE_S = 5.0


@dataclass
class Options:
    model: str
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    max_batch: int = 16
    max_context: int | None = None
    max_queue: int = 256
    api_key: str | None = None
    quiet: bool = False


class _Server(uvicorn.Server):
    """uvicorn's server on a thread of its own: serve() handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@contextlib.contextmanager
def stop_on_signals(server: uvicorn.Server, scheduler: Scheduler):
    """The first SIGTERM or Ctrl-C drains (no new requests, GRACE_S for those in flight), a second one
    stops at once; no signal is re-raised."""

    def handle(sig, frame) -> None:
        if server.should_exit:
            server.force_exit = True
            scheduler.stop(0)
        else:
            server.should_exit = True
            scheduler.stop(GRACE_S)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so that a port in use is said at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ErnieError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port or --host.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_state(opts: Options, progress=None) -> ServeState:
    """Load the model and tokenizer, size the KV pool, start nothing yet."""
    # compile "auto": on CUDA the weights fused as for a captured step (the batch's decode step is
    # captured too); elsewhere eager, as `ernie complete` runs there.
    runtime = completion.load_runtime(opts.model_dir, opts.device, opts.dtype, opts.max_context, opts.quantize, progress, compile="auto")
    names = frozenset({opts.model, opts.model_dir.name, str(opts.model_dir)})
    return make_state(runtime.model, runtime.tokenizer, opts, names, runtime.generation_defaults, completion.stop_token_ids(runtime))


def make_state(model, tokenizer, opts: Options, names: frozenset[str], generation_defaults: dict, stop_ids: frozenset[int]) -> ServeState:
    """The KV pool sized from the memory free beside the model, the scheduler, and what the routes need."""
    cfg = model.config
    context = context_of(cfg, opts.max_context)
    tokens = pool_tokens(model, available_bytes(model.device), opts.max_batch * context)
    if tokens < 2 * BLOCK:
        raise ErnieError(f"no memory is left for the KV cache on {model.device} after loading: use a quantized model or a device with more memory.")
    if tokens < context:
        warn(f"the KV cache holds {tokens:,} tokens, fewer than the context of {context:,}: requests are limited to {tokens:,}.")
        context = tokens
    engine = BatchDecoder(model, tokens, context)
    info(f"KV cache: {engine.tokens:,} tokens in {engine.bytes / 1024**3:.2f} GiB (blocks of {BLOCK}) on {model.device}; "
         f"up to {opts.max_batch} sequences at once, {context:,} tokens each at most", opts.quiet)
    started = time.perf_counter()
    captured = engine.warm(opts.max_batch)  # here, not in the first requests' wait
    if captured:
        info(f"decode step captured as {captured} CUDA graphs (batches up to {opts.max_batch}) in {time.perf_counter() - started:.1f} s", opts.quiet)
    defaults = {k: v for k, v in generation_defaults.items() if k in ("temperature", "top_k", "top_p", "min_p",
                "repetition_penalty", "presence_penalty", "frequency_penalty")}
    return ServeState(Scheduler(engine, opts.max_batch, opts.max_queue), tokenizer, cfg.vocab_size, opts.model, names,
                      context, stop_ids, defaults, opts.api_key)


def uvicorn_server(state: ServeState) -> "_Server":
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(GRACE_S) + 5, timeout_keep_alive=5)
    return _Server(config)


def serve_in_thread(server: uvicorn.Server, scheduler: Scheduler, sock: socket.socket) -> threading.Thread:
    """Start the web side on its own thread; the scheduler stops when it ends, for whatever reason."""

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.stop(0)

    thread = threading.Thread(target=run, name="ernie-http", daemon=True)
    thread.start()
    return thread


def serve(opts: Options, progress=None, stop_progress=lambda: None) -> None:
    sock = listen(opts.host, opts.port)
    try:
        try:
            state = build_state(opts, progress)
        finally:
            stop_progress()
        scheduler = state.scheduler
        server = uvicorn_server(state)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        with stop_on_signals(server, scheduler):
            web = serve_in_thread(server, scheduler, sock)
            info(f"serving {opts.model} on http://{shown}:{port}/v1 (Ctrl-C to stop)", opts.quiet)
            scheduler.run()
            server.should_exit = True
            web.join(GRACE_S + 5)
        info("stopped", opts.quiet)
    finally:
        sock.close()
