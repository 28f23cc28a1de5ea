"""The HTTP side of `ernie serve` (Starlette): routes, the API key, the body limit, and turning a
request into a scheduler job and the job's updates into a response or a stream of events.

Every failure a client can cause is answered with OpenAI's error body and the server goes on; a
client that goes away (read from the ASGI receive channel while it waits) cancels its job, which
leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ernie_cli.runtime.batch import Sequence
from ernie_cli.runtime.completion import TextStream
from ernie_cli.runtime.sampling import SEED_MAX, SamplingParams
from ernie_cli.serve import protocol
from ernie_cli.serve.protocol import ApiError, CompletionParams, Logprobs, TokenNames, bad
from ernie_cli.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown, Update
from ernie_cli.text.tokenizer import ErnieTokenizer

MAX_BODY = 10 * 1024 * 1024
RETRY_AFTER_S = 1
_DISCONNECTED = object()


@dataclass
class ServeState:
    scheduler: Scheduler
    tokenizer: ErnieTokenizer
    vocab: int
    model_id: str
    names: frozenset[str]  # what a request's "model" may say
    context: int
    stop_ids: frozenset[int]
    sampling_defaults: dict = field(default_factory=dict)  # generation_config.json's, where a request sets none
    api_key: str | None = None
    max_body: int = MAX_BODY
    created: int = field(default_factory=protocol.now)


@dataclass
class Prompt:
    ids: list[int]
    text: str  # as echoed
    offsets: list[int]  # each token's offset in text


# ---- the request's way in ---------------------------------------------------------------------------------


def _authorize(state: ServeState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
        raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'.", code="invalid_api_key")


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length", "")
    too_big = bad(f"the request body is over the limit of {limit:,} bytes.", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request body is not valid JSON ({str(exc).splitlines()[0][:120]}).") from None


def _encode(state: ServeState, prompt, most: int) -> Prompt:
    """A prompt (text or ids) -> its ids, checked against the context; the text echo would show."""
    tok = state.tokenizer
    if isinstance(prompt, str):
        ids = tok.encode_within(prompt, most)
        if ids is None:
            raise bad(f"the prompt is over {most} tokens, more than this server's context of {state.context} leaves: shorten it.",
                      "prompt", "context_length_exceeded")
        if not ids:
            raise bad("the prompt is empty after tokenization: give some text to complete.", "prompt")
        text = prompt
    else:
        ids = prompt
        if len(ids) > most:
            raise bad(f"the prompt has {len(ids)} tokens, more than this server's context of {state.context} leaves "
                      f"(at most {most}): shorten it.", "prompt", "context_length_exceeded")
        text = tok.decode(ids)
    stream, offsets = TextStream(tok, []), []
    for t in ids:
        offsets.append(stream.raw)
        stream.add(t)
    return Prompt(ids, text, offsets)


def _job(state: ServeState, params: CompletionParams, prompts: list[Prompt], post) -> Job:
    job = Job(post)
    sampling = {**state.sampling_defaults, **params.sampling}
    for prompt in prompts:
        max_new = min(params.max_tokens, state.context - len(prompt.ids))
        for j in range(params.n):
            seed = None if params.seed is None else (params.seed + j) % (SEED_MAX + 1)
            seq = Sequence(prompt.ids, max_new, SamplingParams(**sampling, seed=seed), params.logprobs,
                           params.logprobs if params.echo else None)
            job.add(seq, state.tokenizer, params.stop, frozenset() if params.ignore_eos else state.stop_ids,
                    len(prompt.text) if params.echo else 0)
    return job


# ---- the job's way out ------------------------------------------------------------------------------------


class ChoiceBuilder:
    """One choice's pieces, as each update brings them: the echoed prompt first, then text, token
    ids and logprobs. delta() gives what an update adds (a stream chunk's choice); whole() all of it."""

    def __init__(self, index: int, prompt: Prompt, params: CompletionParams, names: TokenNames):
        self.index, self.prompt, self.params, self.names = index, prompt, params, names
        self.started = False
        self.next_prompt = 1  # the prompt token whose logprob comes next
        self.all = {"text": [], "token_ids": [], "logprobs": Logprobs() if params.logprobs is not None else None}
        self.finish: str | None = None
        self.stop_reason: str | None = None
        self.tokens = 0

    def delta(self, u: Update) -> dict:
        p, names = self.params, self.names
        text, ids = "", []
        lp = Logprobs() if p.logprobs is not None else None
        first = not self.started
        if first:
            self.started = True
            if p.echo:
                text = self.prompt.text
                if lp is not None:
                    lp.add(names(self.prompt.ids[0]), None, None, 0)
        if lp is not None and u.prompt:
            for logprob, top in u.prompt:
                i = self.next_prompt
                lp.add(names(self.prompt.ids[i]), logprob, names.top(top) or {}, self.prompt.offsets[i])
                self.next_prompt += 1
        for token, logprob, top, offset in u.tokens:
            ids.append(token)
            if lp is not None:
                lp.add(names(token), logprob, names.top(top) or {}, offset)
        self.tokens += len(ids)
        text += u.text
        if u.finish is not None:
            self.finish, self.stop_reason = u.finish, u.stop_reason
        out = {"index": self.index, "text": text, "logprobs": None if lp is None else lp.as_dict(),
               "finish_reason": u.finish, "stop_reason": u.stop_reason}
        if p.return_token_ids:
            out["token_ids"] = ids
            if first:
                out["prompt_token_ids"] = self.prompt.ids
        self.all["text"].append(text)
        self.all["token_ids"] += ids
        if lp is not None:
            self.all["logprobs"].extend(lp)
        return out

    def whole(self) -> dict:
        lp = self.all["logprobs"]
        out = {"index": self.index, "text": "".join(self.all["text"]), "logprobs": None if lp is None else lp.as_dict(),
               "finish_reason": self.finish, "stop_reason": self.stop_reason}
        if self.params.return_token_ids:
            out["prompt_token_ids"] = self.prompt.ids
            out["token_ids"] = self.all["token_ids"]
        return out


class Run:
    """A submitted job, its updates' queue and the builders of its choices."""

    def __init__(self, state: ServeState, params: CompletionParams, prompts: list[Prompt]):
        self.state, self.params, self.prompts = state, params, prompts
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job = _job(state, params, prompts, self._post)
        names = TokenNames(state.tokenizer, params.tokens_as_ids)
        self.builders = [ChoiceBuilder(c.index, prompts[c.index // params.n], params, names) for c in self.job.choices]
        self.id, self.created = protocol.new_id(), protocol.now()
        self.left = len(self.builders)

    def _post(self, updates: list[Update]) -> None:  # the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, updates)

    def cancel(self) -> None:
        if self.left:
            self.job.cancel()
            self.state.scheduler.wake()
            self.left = 0

    async def watch(self, receive) -> None:
        """Put _DISCONNECTED on the queue when the client goes away."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait(_DISCONNECTED)
                return

    async def updates(self):
        """Each batch of updates until every choice has finished; None if the client went away."""
        while self.left:
            item = await self.queue.get()
            if item is _DISCONNECTED:
                self.cancel()
                yield None
                return
            for u in item:
                if u.error is not None:
                    self.left = 0
                    raise ApiError(500, u.error, code="model_error")
                if u.finish is not None:
                    self.left -= 1
            yield item

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(b.tokens for b in self.builders)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.state.model_id, "choices": choices}


async def _collect(run: Run, receive) -> JSONResponse | None:
    watcher = asyncio.create_task(run.watch(receive))
    try:
        async for updates in run.updates():
            if updates is None:
                return None
            for u in updates:
                run.builders[u.index].delta(u)
    finally:
        watcher.cancel()
        run.cancel()
    body = run.envelope([b.whole() for b in run.builders])
    body["usage"] = run.usage()
    return JSONResponse(body)


class EventStream:
    """Server-sent events: one `data: {chunk}` per update of a choice, then `data: [DONE]`."""

    def __init__(self, run: Run):
        self.run = run

    @staticmethod
    def _event(obj) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    async def __call__(self, scope, receive, send) -> None:
        run = self.run
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watcher = asyncio.create_task(run.watch(receive))
        try:
            try:
                async for updates in run.updates():
                    if updates is None:
                        return
                    chunk = run.envelope([run.builders[u.index].delta(u) for u in updates])
                    await send({"type": "http.response.body", "body": self._event(chunk), "more_body": True})
            except ApiError as exc:
                await send({"type": "http.response.body", "body": self._event(exc.body()), "more_body": True})
            else:
                if run.params.include_usage:
                    tail = run.envelope([])
                    tail["usage"] = run.usage()
                    await send({"type": "http.response.body", "body": self._event(tail), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()
            run.cancel()


# ---- routes ---------------------------------------------------------------------------------------------


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(state: ServeState) -> Starlette:
    async def completions(request: Request):
        try:
            _authorize(state, request)
            params = protocol.parse(await _read_json(request, state.max_body), state.vocab)
            if params.model is not None and params.model not in state.names:
                raise ApiError(404, f"the model '{params.model}' does not exist here: this server serves '{state.model_id}'.",
                               "model", "model_not_found")
            most = state.context - (1 if params.max_tokens > 0 else 0)
            prompts = [await run_in_threadpool(_encode, state, p, most) for p in params.prompts]
            run = Run(state, params, prompts)
            try:
                state.scheduler.submit(run.job)
            except QueueFull:
                raise ApiError(503, "the server's queue is full: retry later.", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            except ShuttingDown:
                raise ApiError(503, "the server is shutting down.", code="shutting_down") from None
            if params.stream:
                return EventStream(run)
            response = await _collect(run, request.receive)
            return response if response is not None else JSONResponse({}, status_code=499)
        except ApiError as exc:
            return _error(exc)

    async def models(request: Request):
        try:
            _authorize(state, request)
        except ApiError as exc:
            return _error(exc)
        card = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "ernie", "max_model_len": state.context}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request):
        if not state.scheduler.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: HTTPException):
        what = "no such route" if exc.status_code == 404 else exc.detail
        return _error(ApiError(exc.status_code, f"{what}: {request.method} {request.url.path}.", code=str(exc.status_code)))

    async def server_error(request: Request, exc: Exception):
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
