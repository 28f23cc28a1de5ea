"""The prompt of `ernie complete`: gathered from -f FILE, stdin and the argument, and held against
the context before any weights are read.

Reading is bounded, because a prompt too long for the context should cost a refusal, not the time
and memory of reading and encoding all of it. Text of B bytes has at least B / max_token_bytes
tokens (ErnieTokenizer.max_token_bytes), so at most (context - 1) x max_token_bytes bytes can ever
fit, and no source is read further than that plus one byte. Text within that bound is encoded in
pieces, stopping as soon as it has more tokens than the context holds.

Nothing here imports torch, so that a refusal comes before torch is even loaded.
"""

from __future__ import annotations

import os
import select
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from ernie_cli.console import warn
from ernie_cli.errors import ErnieError, UsageError
from ernie_cli.model.config import ErnieConfig, load_config
from ernie_cli.text.tokenizer import ErnieTokenizer, load_tokenizer

NO_STDIN_HINT = "pass --no-stdin (or set ERNIE_NO_STDIN=1) to leave stdin alone"
# How long stdin may stay silent, with a prompt given elsewhere, before the wait is explained.
STDIN_NOTICE_S = 1.0


@dataclass
class Sources:
    """Where the prompt comes from, checked (and the file opened) before any model is looked at."""

    argument: str | None
    file: Path | None
    file_handle: BinaryIO | None
    stdin: str  # "only" ('-'), "piped" (prepended when not a terminal) or "off"


@dataclass
class Prompt:
    text: str
    ids: list[int]
    tokenizer: ErnieTokenizer
    config: ErnieConfig


def stdin_is_piped() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.isatty()
    except ValueError:  # closed
        return False


def sources(argument: str | None, file: Path | None, no_stdin: bool) -> Sources:
    """llm's convention: -f FILE first, then piped stdin, then the argument; '-' reads stdin only."""
    if argument == "-":
        if no_stdin:
            raise UsageError("the prompt '-' reads stdin, which --no-stdin (or ERNIE_NO_STDIN) turns off: drop one of them.")
        argument, stdin = None, "only"
    else:
        stdin = "piped" if not no_stdin and stdin_is_piped() else "off"
    if argument is None and file is None and stdin == "off":
        raise UsageError('no prompt: pass it as an argument (ernie complete "Once upon a time"), with -f FILE, or on stdin.')
    handle = None
    if file is not None:
        try:
            handle = open(file, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read --file {file}: {exc.strerror or exc}.") from None
    return Sources(argument, file, handle, stdin)


def context_of(config: ErnieConfig, max_context: int | None) -> int:
    return min(max_context or config.max_position_embeddings, config.max_position_embeddings)


def _shorten(config: ErnieConfig, context: int) -> str:
    return "shorten it" + (" or raise --max-context." if context < config.max_position_embeddings else ".")


def prepare(model_dir: Path, src: Sources, max_context: int | None) -> Prompt:
    """Read the prompt within the context's byte bound and encode it; refuse one that cannot fit."""
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    context = context_of(config, max_context)
    # max_token_bytes walks the whole vocabulary (0.15 s of a one-shot run on the GPU machine). Being
    # at least 4, it bounds nothing that an argument alone of at most 4 bytes a position could pass.
    short_argument = src.file_handle is None and src.stdin == "off" and len((src.argument or "").encode("utf-8")) <= (context - 1) * 4
    per_token = None if short_argument else tokenizer.max_token_bytes
    limit = None if per_token is None else (context - 1) * per_token

    def too_long() -> ErnieError:
        return ErnieError(
            f"the prompt is over {limit:,} bytes, more than a context of {context} tokens can hold "
            f"(a token is at most {per_token} bytes): {_shorten(config, context)}"
        )

    text = gather(src, limit, too_long)
    return Prompt(text, encode(tokenizer, config, text, context, model_dir), tokenizer, config)


def gather(src: Sources, limit: int | None, too_long: Callable[[], ErnieError]) -> str:
    """The prompt's text from its sources, reading no more than limit + 1 bytes in all (too_long()
    is raised past limit); needs no model."""
    parts = []
    budget = limit
    if src.argument is not None:
        budget = None if budget is None else budget - len(src.argument.encode("utf-8"))
    if src.file_handle is not None:
        with src.file_handle:
            data = _read(src.file_handle, budget)
        parts.append(_decode(data, str(src.file)))
        budget = None if budget is None else budget - len(data)
    if budget is not None and budget < 0:
        raise too_long()
    if src.stdin != "off":
        _explain_stdin(src)
        data = _read(sys.stdin.buffer, budget)
        budget = None if budget is None else budget - len(data)
        if data or src.stdin == "only":  # an empty piped stdin (cron, CI) is no prompt
            parts.append(_decode(data, "stdin"))
    if budget is not None and budget < 0:
        raise too_long()
    if src.argument is not None:
        parts.append(src.argument)
    if not any(parts):
        raise UsageError('no prompt: pass it as an argument (ernie complete "Once upon a time"), with -f FILE, or on stdin.')
    text = parts[0]
    for part in parts[1:]:
        text += part if not text or text[-1].isspace() else " " + part
    return text


def encode(tokenizer: ErnieTokenizer, config: ErnieConfig, text: str, context: int, model_dir: Path) -> list[int]:
    """The prompt's ids, checked against the context and the model's vocabulary."""
    ids = tokenizer.encode_within(text, context - 1)
    if ids is None:
        raise ErnieError(f"the prompt is over {context - 1} tokens but the context holds {context}: {_shorten(config, context)}")
    if not ids:
        raise ErnieError("the prompt is empty after tokenization: give some text to complete.")
    top_id = max(ids)
    if top_id >= config.vocab_size:  # the embedding lookup would fail with a bare IndexError
        raise ErnieError(
            f"the tokenizer gave token id {top_id} but the model has {config.vocab_size} embeddings: "
            f"the tokenizer files in {model_dir} do not belong to this checkpoint; copy in the model's own."
        )
    return ids


def _read(stream: BinaryIO, budget: int | None) -> bytes:
    """All of the stream, or budget + 1 bytes when it holds more than budget (enough to know it does)."""
    if budget is None:
        return stream.read()
    if budget < 0:
        return b""
    return stream.read(budget + 1)


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        warn(f"{what} is not valid UTF-8; undecodable bytes were replaced with U+FFFD.")
        return data.decode("utf-8", errors="replace")


def _explain_stdin(src: Sources) -> None:
    """Say so when piped stdin is about to become part of a prompt given elsewhere by mistake.

    Two shell pitfalls: inside `while read line; do ernie complete "$line"; done < list` the first
    run takes the rest of the list as its prompt (stdin is the loop's file, already partly read),
    and `sleep 20 | ernie complete hi` waits for the pipe to close.
    """
    if src.stdin != "piped" or (src.argument is None and src.file is None):
        return
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            if offset > 0:
                warn(
                    f"stdin is a file already read up to byte {offset} (as in a `while read` loop); "
                    f"the rest of it goes before the prompt: {NO_STDIN_HINT}."
                )
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            ready, _, _ = select.select([fd], [], [], STDIN_NOTICE_S)
            if not ready:
                warn(f"waiting for stdin, which goes before the prompt until it is closed: {NO_STDIN_HINT}.")
    except (OSError, ValueError, AttributeError):  # no real file descriptor (an embedding host, Windows pipes)
        return
