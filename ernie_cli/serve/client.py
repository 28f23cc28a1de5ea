"""`ernie complete --server URL`: the same command line, answered by a running `ernie serve`.

Only the standard library and the CLI's own light modules: no torch, no model files, so a call
starts in a fraction of a second. The request streams (server-sent events) so the text reaches
stdout as it is made, and asks for token ids (vLLM's return_token_ids and
return_tokens_as_token_ids), so that --json holds the same ids and logprobs as a local run.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ernie_cli.console import info, warn, write_stdout
from ernie_cli.errors import ErnieError, UsageError

CONNECT_TIMEOUT_S = 10.0
MAX_BODY = 10 * 1024 * 1024  # the server's limit on a request body
BUSY_RETRIES = 60  # 503 "queue full" answers waited out (each by its Retry-After) before giving up


@dataclass
class Answer:
    model: str = ""
    text: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    finish: str | None = None
    stop_reason: str | None = None
    first_token_s: float = 0.0
    total_s: float = 0.0


def endpoint(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path of /v1/completions) from http://HOST[:PORT][/v1]."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server {url!r} is not an http:// or https:// URL.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"--server {url!r} has no valid port.") from None
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return parts.scheme, parts.hostname, port, path + "/completions"


def _token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))


def _connect(url: str, body: bytes, api_key: str | None):
    scheme, host, port, path = endpoint(url)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(BUSY_RETRIES + 1):
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.request("POST", path, body=body, headers=headers)
            conn.sock.settimeout(None)  # a request may wait in the server's queue, and a long completion runs long
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise ErnieError(f"cannot reach the server at {url} ({reason}): start one with `ernie serve -m MODEL`, or check --server / ERNIE_SERVER.") from None
        if response.status == 503 and response.getheader("Retry-After") and attempt < BUSY_RETRIES:
            wait = float(response.getheader("Retry-After") or 1)
            if attempt == 0:
                warn(f"the server's queue is full; retrying every {wait:g} s.")
            conn.close()
            time.sleep(wait)
            continue
        return conn, response
    raise AssertionError("unreachable")


def _error_of(response, url: str) -> ErnieError:
    raw = response.read(64 * 1024)
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip()[:200] or response.reason
    if response.status == 401:
        return ErnieError(f"the server at {url} refused the API key ({message}); set ERNIE_API_KEY to the server's key.")
    return ErnieError(f"the server at {url} answered {response.status}: {message}")


def _events(response):
    """The data of each server-sent event."""
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def request(url: str, body: dict, api_key: str | None, on_text) -> Answer:
    answer = Answer()
    start = time.perf_counter()
    conn, response = _connect(url, json.dumps(body, ensure_ascii=False).encode(), api_key)
    try:
        if response.status != 200:
            raise _error_of(response, url)
        for event in _events(response):
            if "error" in event:
                raise ErnieError(f"the server at {url} failed: {event['error'].get('message')}")
            answer.model = event.get("model", answer.model)
            for choice in event.get("choices", []):
                if choice.get("prompt_token_ids") is not None:
                    answer.prompt_tokens = choice["prompt_token_ids"]
                if choice.get("token_ids") and not answer.tokens:
                    answer.first_token_s = time.perf_counter() - start
                answer.tokens += choice.get("token_ids") or []
                lp = choice.get("logprobs")
                if lp is not None:
                    answer.logprobs = answer.logprobs or []
                    for name, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
                        entry = {"id": _token_id(name), "logprob": value}
                        if top:
                            entry["top"] = [[_token_id(k), v] for k, v in top.items()]
                        answer.logprobs.append(entry)
                if choice.get("text"):
                    answer.text.append(choice["text"])
                    on_text(choice["text"])
                if choice.get("finish_reason"):
                    answer.finish, answer.stop_reason = choice["finish_reason"], choice.get("stop_reason")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ErnieError(f"the connection to the server at {url} broke ({exc or type(exc).__name__}): try again.") from None
    finally:
        conn.close()
    answer.total_s = time.perf_counter() - start
    if answer.finish == "abort":
        raise ErnieError(f"the server at {url} stopped before the completion finished: try again once it is back.")
    if answer.finish is None:
        raise ErnieError(f"the server at {url} ended the stream before the completion finished: try again.")
    return answer


def complete(url: str, src, *, model: str | None, max_tokens: int, sampling: dict, seed: int | None, stops: list[str],
             ignore_eos: bool, echo: bool, as_json: bool, logprobs: int | None, quiet: bool, stages=None, verbose: bool = False) -> None:
    """Run one completion on the server, printing exactly what `ernie complete` prints locally.
    stages: a runtime.stages.Stages to account the request in."""
    from ernie_cli.text import prompt as prompt_module

    def too_long() -> ErnieError:
        return ErnieError(f"the prompt is over {MAX_BODY // 2**20} MB, more than the server takes in one request: shorten it.")

    text = prompt_module.gather(src, MAX_BODY - 64 * 1024, too_long)
    body = {"prompt": text, "max_tokens": max_tokens, **sampling, "stream": True, "return_token_ids": True}
    if model is not None:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if stops:
        body["stop"] = stops
    if ignore_eos:
        body["ignore_eos"] = True
    if as_json and logprobs is not None:
        body.update(logprobs=logprobs, return_tokens_as_token_ids=True)
    if echo and not as_json:
        write_stdout(text)
    answer = request(url, body, os.environ.get("ERNIE_API_KEY") or None, (lambda s: None) if as_json else write_stdout)
    finish = answer.finish if answer.finish != "stop" else ("stop" if answer.stop_reason is not None else "eos")
    completion = "".join(answer.text)
    n_prompt, n_out = len(answer.prompt_tokens), len(answer.tokens)
    prefill_s = answer.first_token_s
    decode_s = max(answer.total_s - prefill_s, 0.0)
    prefill_tps = n_prompt / prefill_s if prefill_s else 0.0
    if stages is not None:
        stages.add("prefill", prefill_s)
        stages.add("decode", decode_s)
        stages.mark("other")
    decode_tps = (n_out - 1) / decode_s if decode_s and n_out > 1 else 0.0
    if as_json:
        record = {
            "model": model or answer.model,
            "prompt": text,
            "text": completion,
            "prompt_tokens": answer.prompt_tokens,
            "tokens": answer.tokens,
            "finish_reason": finish,
            "logprobs": answer.logprobs if logprobs is not None else None,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            # The server's first decode step is not told apart: everything after the first token is decode.
            "timings": {"load_s": 0.0, "prefill_s": prefill_s, "first_step_s": 0.0, "decode_s": decode_s,
                        "prefill_tokens_per_s": prefill_tps, "decode_tokens_per_s": decode_tps,
                        "stages": stages.seconds if stages is not None else {}},
        }
        write_stdout(json.dumps(record, ensure_ascii=False) + "\n")
    elif completion and not completion.endswith("\n") and _stdout_is_tty():
        write_stdout("\n")
    info(f"{n_prompt} prompt tokens, {n_out} generated; first token after {prefill_s * 1000:.0f} ms, "
         f"decode {decode_tps:.1f} tok/s; server {url}; finish: {finish}", quiet)
    if verbose and stages is not None:
        info(stages.table())


def _stdout_is_tty() -> bool:
    import sys

    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False

