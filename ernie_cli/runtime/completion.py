"""Text in, text out: the runtime behind `ernie complete`.

Glues the pieces together: resolve and load the model and tokenizer, apply the model's
generation_config.json defaults, run the token loop, turn tokens into text as soon as it is final,
and cut at stop strings (matched on text, so a stop string split across tokens still stops).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ernie_cli.errors import check_interrupt
from ernie_cli.kernels.triton import warm as triton_warm
from ernie_cli.model.config import ErnieConfig, load_config
from ernie_cli.model.ernie import ErnieForCausalLM
from ernie_cli.runtime.decoder import Decoder, step_mode
from ernie_cli.runtime.generate import Timings, generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.runtime.stages import Stages
from ernie_cli.text.detokenize import StreamingDetokenizer
from ernie_cli.text.prompt import context_of, encode
from ernie_cli.text.tokenizer import ErnieTokenizer, load_tokenizer
from ernie_cli.weights.loader import (
    kv_cache_bytes,
    load_model,
    prepare_for_decoding,
    resolve_device,
    resolve_dtype,
    start_device,
)

# Keys of generation_config.json that map onto our sampling options.
_GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class Runtime:
    model: ErnieForCausalLM
    tokenizer: ErnieTokenizer
    config: ErnieConfig
    model_dir: Path
    generation_defaults: dict
    load_s: float
    decoder: Decoder  # or parallel.lockstep.Leader, rank 0's decoder of a split model


def generation_defaults(model_dir: Path) -> dict:
    """Sampling defaults from generation_config.json; do_sample false means greedy."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    found = {k: raw[k] for k in _GENERATION_KEYS if isinstance(raw.get(k), (int, float))}
    if raw.get("do_sample") is False:
        found["temperature"] = 0.0
    if raw.get("eos_token_id") is not None:
        eos = raw["eos_token_id"]
        found["eos_token_id"] = eos if isinstance(eos, list) else [eos]
    return found


def load_runtime(
    model_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    max_context: int | None = None,
    quantize: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    compile: str = "auto",
    tokenizer: ErnieTokenizer | None = None,
    stages: Stages | None = None,
    tp: int = 1,
) -> Runtime:
    """tp > 1: the model split over that many processes (docs/multi-gpu.md), rank 0 being this one."""
    start = time.perf_counter()
    stages = stages or Stages()
    tokenizer = tokenizer or load_tokenizer(model_dir)
    cfg = load_config(model_dir)
    dev = resolve_device(device)
    start_device(dev)
    hashing = triton_warm.begin(dev)
    stages.mark("device")
    context = max_context or cfg.max_position_embeddings
    # The cache is sized per request, but refusing early beats failing after the weights are in.
    reserve = kv_cache_bytes(cfg, min(context, 8192), resolve_dtype(dtype, cfg, dev))
    if tp > 1:  # eager steps: the captured or compiled step and its fusions are for one process
        from ernie_cli.parallel.launch import Weights, load_split

        decoder = load_split(Weights(cfg, resolve_dtype(dtype, cfg, dev), model_dir), tp, dev, progress, reserve)
        check_interrupt()
        stages.mark("weights")
    else:
        kwargs = {"quantize": quantize} if quantize else {}
        model = load_model(model_dir, dev, dtype, progress=progress, reserve_bytes=reserve, **kwargs)
        check_interrupt()  # a Ctrl-C swallowed while loading must not let the run go on
        stages.mark("weights")
        mode = step_mode(compile, dev)
        decoder = Decoder(prepare_for_decoding(model, mode), mode)
    triton_warm.finish(hashing)  # the prompt's forward launches the first Triton kernels
    stages.mark("prepare")
    model = decoder.model
    return Runtime(model, tokenizer, model.config, model_dir, generation_defaults(model_dir), time.perf_counter() - start, decoder)


@dataclass
class Request:
    prompt: str
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    max_context: int | None = None
    prompt_ids: list[int] | None = None  # the prompt already encoded (and checked) by prompt.prepare


@dataclass
class Result:
    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "eos"
    logprobs: list[dict] | None
    timings: Timings


class StopMatcher:
    """Holds back text that might be the start of a stop string; reports where a stop string begins."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None  # the stop string found (the earliest; the first listed on a tie)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was found)."""
        self.pending += text
        hits = [(i, n) for n, i in enumerate(self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            at, n = min(hits)
            out, self.pending, self.matched = self.pending[:at], "", self.stops[n]
            return out, True
        keep = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Generated ids in, final text out: whole characters only (StreamingDetokenizer), cut before
    the first stop string (StopMatcher). `raw` counts the characters the ids spelled before any cut,
    so a token's offset in the text is known as it arrives."""

    def __init__(self, tokenizer: ErnieTokenizer, stops: list[str]):
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = StopMatcher(stops)
        self.raw = 0

    def add(self, token: int) -> tuple[str, bool]:
        """(text made final by this token, whether a stop string was found)."""
        return self._feed(self.detok.add(token))

    def finish(self) -> tuple[str, bool]:
        """The rest at the end of the sequence (not called after a stop string was found)."""
        text, stopped = self._feed(self.detok.flush())
        return (text, True) if stopped else (text + self.stops.flush(), False)

    def _feed(self, piece: str) -> tuple[str, bool]:
        self.raw += len(piece)
        return self.stops.feed(piece)

    @property
    def stopped_at(self) -> str | None:
        """The stop string that ended the text."""
        return self.stops.matched


def stop_token_ids(runtime: Runtime, ignore_eos: bool = False) -> frozenset[int]:
    """The ids that end a completion: the model's end-of-text tokens, from every place that names them."""
    if ignore_eos:
        return frozenset()
    tok, cfg = runtime.tokenizer, runtime.config
    return frozenset(set(runtime.generation_defaults.get("eos_token_id", [])) | set(cfg.eos_token_ids) | {tok.eos_token_id})


def run_completion(runtime: Runtime, request: Request, on_text: Callable[[str], None] = lambda s: None) -> Result:
    """Run one completion, calling on_text with each piece of final text as soon as it exists."""
    tok, cfg = runtime.tokenizer, runtime.config
    context = context_of(cfg, request.max_context)
    prompt_ids = request.prompt_ids
    if prompt_ids is None:
        prompt_ids = encode(tok, cfg, request.prompt, context, runtime.model_dir)
    max_new = min(request.max_tokens, context - len(prompt_ids))
    stop_ids = stop_token_ids(runtime, request.ignore_eos)

    sampler = Sampler(request.sampling, cfg.vocab_size, runtime.model.device)
    stream = TextStream(tok, request.stop)
    timings = Timings()
    tokens: list[int] = []
    logprobs: list[dict] | None = [] if request.logprobs is not None else None
    pieces: list[str] = []
    finish = "length"

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            on_text(text)

    for step in generate(runtime.model, prompt_ids, max_new, sampler, stop_ids, request.logprobs, timings, runtime.decoder):
        check_interrupt()
        tokens.append(step.token)
        if logprobs is not None:
            entry = {"id": step.token, "logprob": step.logprob}
            if step.top is not None:
                entry["top"] = [[i, lp] for i, lp in step.top]
            logprobs.append(entry)
        if step.token in stop_ids:
            finish = "eos"
            break
        text, stopped = stream.add(step.token)
        emit(text)
        if stopped:
            finish = "stop"
            break
    if finish != "stop":
        text, stopped = stream.finish()
        emit(text)
        if stopped:
            finish = "stop"
    return Result("".join(pieces), prompt_ids, tokens, finish, logprobs, timings)
