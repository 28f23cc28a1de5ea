"""`ernie serve`: the model loaded once, answering OpenAI's completions API with continuous batching."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Optional

import typer

from ernie_cli.console import byte_progress, warn
from ernie_cli.errors import UsageError, deferred_interrupts
from ernie_cli.weights.hub import DEFAULT_MODEL


def serve(
    model: Annotated[str, typer.Option("-m", "--model", help="Hub repo id or local directory.")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, printed at start-up).")] = 8000,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bfloat16, float16 or float32.")] = "auto",
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="Quantize a float checkpoint while loading: int8 or int4.", show_default=False)] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most sequences decoded together (n > 1 counts n).")] = 16,
    max_context: Annotated[Optional[int], typer.Option("--max-context", help="Most positions per request (prompt + output). [default: the model's]", show_default=False)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Most requests waiting for a place in the batch; past it, 503 with Retry-After.")] = 256,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="ERNIE_API_KEY", show_envvar=False, help="Require 'Authorization: Bearer KEY' on /v1 (also ERNIE_API_KEY).", show_default=False)] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network (as HF_HUB_OFFLINE=1).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Nothing on stderr but warnings and errors.")] = False,
) -> None:
    """Serve POST /v1/completions (OpenAI's legacy completions API), GET /v1/models and GET /health."""
    from ernie_cli.commands.checks import check_model_options

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {port}.")
    if max_batch < 1:
        raise UsageError("--max-batch must be at least 1.")
    if max_queue < 1:
        raise UsageError("--max-queue must be at least 1.")
    check_model_options(dtype, quantize, device, max_context)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key (or ERNIE_API_KEY) is empty: give a key, or leave it unset for no key.")
    if api_key is None and not _loopback(host):
        warn(f"listening on {host} without an API key: anyone who can reach it can use the model (set --api-key or ERNIE_API_KEY).")

    from ernie_cli.weights.hub import resolve_model

    model_dir = resolve_model(model, offline=True if offline else None, quiet=quiet)
    with deferred_interrupts():  # torch is imported here
        from ernie_cli.serve import server

    progress, stop_progress = byte_progress("loading weights", quiet)
    options = server.Options(model, model_dir, host, port, device, dtype, quantize, max_batch, max_context, max_queue, api_key, quiet)
    server.serve(options, progress, stop_progress)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
