"""OpenAI's legacy completions API as vLLM implements it: requests checked field by field into
CompletionParams, errors as OpenAI's error body, and the response and stream chunks built from the
scheduler's updates. No torch here and no web framework: plain data in, plain data out."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from ernie_cli.runtime.sampling import SEED_MAX

MAX_N = 128
MAX_PROMPTS = 1024
MAX_STOPS = 16
MAX_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a logprob below this is written as this (vLLM's rule)
DEFAULT_MAX_TOKENS = 16  # OpenAI's

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
KNOWN_FIELDS = frozenset(SAMPLING_FIELDS) | {
    "model", "prompt", "max_tokens", "seed", "stop", "n", "stream", "stream_options", "logprobs", "echo", "suffix",
    "best_of", "user", "logit_bias", "ignore_eos", "return_token_ids", "return_tokens_as_token_ids",
}


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class CompletionParams:
    prompts: list  # each a str or a list of token ids
    model: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: dict = field(default_factory=dict)  # only the fields the request set; the model's defaults fill the rest
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False
    tokens_as_ids: bool = False


# The sampler's own limits (runtime/sampling.SamplingParams.validate), in the API's names.
RANGES = [
    ("temperature", lambda v: v >= 0, ">= 0"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_p", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("repetition_penalty", lambda v: v > 0, "> 0"),
    ("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    ("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, lo: int, hi: int | None = None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, not {type(v).__name__}.", name)
    if v < lo or (hi is not None and v > hi):
        raise bad(f"'{name}' must be {f'between {lo} and {hi}' if hi is not None else f'at least {lo}'}, not {v}.", name)
    return v


def _float(body: dict, name: str):
    v = body.get(name)
    if v is None:
        return None
    if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
        raise bad(f"'{name}' must be a number, not {type(v).__name__}.", name)
    if not math.isfinite(v):
        raise bad(f"'{name}' must be a finite number.", name)
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, not {type(v).__name__}.", name)
    return v


def _prompts(value, vocab: int) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists, and not empty.", "prompt")
    if all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif all(_is_int(t) for t in value):
        prompts = [value]
    elif all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
        prompts = value
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of non-empty token-id lists.", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} are taken in one request.", "prompt")
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab for t in p):
            raise bad(f"'prompt' holds a token id outside the vocabulary of {vocab}.", "prompt")
    return prompts


def parse(body, vocab: int) -> CompletionParams:
    """A decoded JSON body -> CompletionParams, or ApiError(400) naming the first field at fault."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise bad(f"unrecognized request argument supplied: {', '.join(unknown)}.", unknown[0])
    if "prompt" not in body:
        raise bad("'prompt' is required.", "prompt")
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' is not supported: a base model completes text from its end.", "suffix")
    if body.get("logit_bias") not in (None, {}):
        raise bad("'logit_bias' is not supported.", "logit_bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string.", "user")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string.", "model")
    p = CompletionParams(_prompts(body["prompt"], vocab), model)
    p.n = _int(body, "n", 1, MAX_N, 1)
    best_of = _int(body, "best_of", 1, None)
    if best_of is not None and best_of != p.n:
        if best_of < p.n:
            raise bad(f"'best_of' ({best_of}) must not be less than 'n' ({p.n}).", "best_of")
        raise bad("'best_of' greater than 'n' is not supported: ask for n completions and choose among them.", "best_of")
    p.echo = _bool(body, "echo")
    p.max_tokens = _int(body, "max_tokens", 0, None, DEFAULT_MAX_TOKENS)
    if p.max_tokens == 0 and not p.echo:
        raise bad("'max_tokens' may be 0 only with 'echo': true.", "max_tokens")
    p.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    p.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not p.stream:
            raise bad("'stream_options' needs 'stream': true.", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("'stream_options' takes only {\"include_usage\": true|false}.", "stream_options")
        p.include_usage = _bool(options, "include_usage")
    p.ignore_eos = _bool(body, "ignore_eos")
    p.return_token_ids = _bool(body, "return_token_ids")
    p.tokens_as_ids = _bool(body, "return_tokens_as_token_ids")
    p.seed = _int(body, "seed", 0, SEED_MAX)
    stop = body.get("stop")
    if isinstance(stop, str):
        p.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOPS:
            raise bad(f"'stop' takes at most {MAX_STOPS} strings.", "stop")
        p.stop = list(stop)
    elif stop is not None:
        raise bad("'stop' must be a string or a list of strings.", "stop")
    sampling = {name: _float(body, name) for name in SAMPLING_FIELDS if name != "top_k"}
    top_k = _int(body, "top_k", -1, None)
    sampling["top_k"] = 0 if top_k == -1 else top_k  # vLLM's -1 and our 0 both turn it off
    p.sampling = {k: v for k, v in sampling.items() if v is not None}
    for name, ok, rule in RANGES:
        if name in p.sampling and not ok(p.sampling[name]):
            raise bad(f"'{name}' must be {rule}, not {p.sampling[name]}.", name)
    return p


# ---- responses --------------------------------------------------------------------------------------------


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def floor(lp: float | None) -> float | None:
    return None if lp is None else max(lp, LOGPROB_FLOOR)


class TokenNames:
    """How a token is written in logprobs: its text, `bytes:\\xNN` for a byte token, or with
    return_tokens_as_token_ids `token_id:N` (vLLM's extension, which keeps ids exact)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        piece = self.tokenizer.decode_piece(token)
        if piece is None:
            return ""
        return f"bytes:\\x{piece:02x}" if isinstance(piece, int) else piece

    def top(self, pairs) -> dict | None:
        if pairs is None:
            return None
        out: dict[str, float] = {}
        for token, lp in pairs:
            out.setdefault(self(token), floor(lp))
        return out


@dataclass
class Logprobs:
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    text_offset: list = field(default_factory=list)

    def add(self, name: str, logprob, top, offset: int) -> None:
        self.tokens.append(name)
        self.token_logprobs.append(floor(logprob))
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def extend(self, other: "Logprobs") -> None:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, key).extend(getattr(other, key))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}
