"""Continuous batching: the one thread that drives the engine, and the jobs that wait on it.

A job is one HTTP request: one or more choices (its prompts times n), each a sequence in the
engine. Choices wait in one first-in first-out queue; before every step the scheduler admits as
many as the batch and the KV pool have room for (the head of the queue waits for room rather than
being passed), so a request that arrives while others run joins them at the next step. After the
step each choice's token goes through its own text stream (whole characters, stop strings); a
choice that finished, or whose client went away, leaves the batch and gives its blocks back before
the next step.

The web side and this thread meet in two places only: submit() (under a lock) and Job.cancel(),
a flag read before each step. Updates go back through the job's own asyncio queue, on its loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ernie_cli.runtime.batch import BatchDecoder, Sequence
from ernie_cli.runtime.completion import TextStream
from ernie_cli.text.tokenizer import ErnieTokenizer

NOT_FINITE = ("the model's logits are not finite (NaN or Inf): its weights are damaged or overflow this dtype; "
              "restart the server with --dtype float32 or a fresh download.")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Update:
    """What a step made for one choice: sent to the job's handler."""

    index: int
    text: str = ""
    tokens: list[tuple[int, float | None, list | None, int]] = field(default_factory=list)  # (id, logprob, top, text offset)
    prompt: list[tuple[float, list | None]] | None = None  # logprobs of the prompt tokens read (echo)
    finish: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | None = None  # the stop string that ended it (None after the end-of-text token)
    error: str | None = None


@dataclass
class Choice:
    job: "Job"
    index: int
    seq: Sequence
    stream: TextStream
    stop_ids: frozenset[int]
    offset: int = 0  # characters before the first generated one (the echoed prompt)
    finished: bool = False


class Job:
    """One request's choices and its way back to the handler (`post(updates)`, thread-safe)."""

    def __init__(self, post: Callable[[list[Update]], None]):
        self.post = post
        self.choices: list[Choice] = []
        self.cancelled = False
        self.submitted = time.monotonic()

    def add(self, seq: Sequence, tokenizer: ErnieTokenizer, stops: list[str], stop_ids: frozenset[int], offset: int = 0) -> None:
        self.choices.append(Choice(self, len(self.choices), seq, TextStream(tokenizer, stops), stop_ids, offset))

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, engine: BatchDecoder, max_batch: int, max_queue: int, on_step: Callable[[int], None] | None = None):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.on_step = on_step  # called with the batch size of each step (tests, statistics)
        self.waiting: deque[Choice] = deque()
        self.running: list[Choice] = []
        self.lock = threading.Condition()
        self.accepting = True
        self.abort_at: float | None = None  # once shutting down: when the rest is aborted

    # ---- the web side ---------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.lock:
            if not self.accepting:
                raise ShuttingDown()
            if len({c.job for c in self.waiting}) >= self.max_queue:
                raise QueueFull()
            self.waiting.extend(job.choices)
            self.lock.notify()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def stop(self, grace: float) -> None:
        """Take no more requests; let those in flight finish for `grace` seconds, then abort them."""
        with self.lock:
            self.accepting = False
            self.abort_at = time.monotonic() + grace
            self.lock.notify()

    # ---- the engine's thread ------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.lock:
                while not self.running and not self.waiting and self.accepting:
                    self.lock.wait()
                if not self.accepting and not self.running and not self.waiting:
                    return
                aborting = self.abort_at is not None and time.monotonic() >= self.abort_at
            if aborting:
                self._abort_all()
                continue
            self.step()
            if not self.running and not self.waiting_admissible():
                with self.lock:  # nothing can run: sleep until something changes
                    self.lock.wait(0.05)

    def waiting_admissible(self) -> bool:
        return bool(self.waiting) and len(self.running) < self.max_batch

    def step(self) -> int:
        """Drop the cancelled, admit who fits, run one forward and hand out its results. Returns the batch size."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return 0
        batch = list(self.running)
        try:
            outputs = self.engine.step([c.seq for c in batch])
        except Exception as exc:  # noqa: BLE001 - one bad step must not stop the server
            for choice in batch:
                if not choice.finished:
                    self._fail(choice, f"the step failed: {type(exc).__name__}: {exc}")
            self.running = [c for c in self.running if not c.finished]
            return 0
        size = len(outputs)
        by_job: dict[Job, list[Update]] = {}
        for i, out in outputs.items():
            choice = batch[i]
            if choice.finished:  # another choice of its job failed in this step
                continue
            update = self._advance(choice, out)
            if update is not None:
                by_job.setdefault(choice.job, []).append(update)
        for job, updates in by_job.items():
            job.post(updates)
        self.running = [c for c in self.running if not c.finished]
        if self.on_step is not None:
            self.on_step(size)
        return size

    def _advance(self, choice: Choice, out) -> Update | None:
        seq = choice.seq
        update = Update(choice.index)
        if out.prompt:
            update.prompt = out.prompt
        step = out.step
        if step is None:
            if not seq.reading and seq.max_new == 0:  # echo with max_tokens 0: the prompt was all
                self._finish(choice, update, "length")
            return update if (update.prompt or update.finish) else None
        if step.token < 0:
            self._fail(choice, NOT_FINITE)
            return None
        offset = choice.offset + choice.stream.raw
        update.tokens.append((step.token, step.logprob, step.top, offset))
        if step.token in choice.stop_ids:  # the end-of-text token: its text is not part of the completion
            return self._finish(choice, update, "stop")
        text, stopped = choice.stream.add(step.token)
        update.text = text
        if stopped:
            update.stop_reason = choice.stream.stopped_at
            return self._finish(choice, update, "stop", flush=False)
        if len(seq.generated) >= seq.max_new:
            return self._finish(choice, update, "length")
        return update

    def _finish(self, choice: Choice, update: Update, reason: str, flush: bool = True) -> Update:
        if flush:
            text, stopped = choice.stream.finish()
            update.text += text
            if stopped:
                reason, update.stop_reason = "stop", choice.stream.stopped_at
        update.finish = reason
        choice.finished = True
        self.engine.release(choice.seq)
        return update

    def _fail(self, choice: Choice, message: str) -> None:
        """An error ends the whole job: its other choices leave too."""
        job = choice.job
        job.cancel()
        for c in job.choices:
            if not c.finished:
                c.finished = True
                if c.seq.blocks:
                    self.engine.release(c.seq)
        job.post([Update(choice.index, error=message)])

    def _drop_cancelled(self) -> None:
        with self.lock:
            if any(c.job.cancelled for c in self.waiting):
                self.waiting = deque(c for c in self.waiting if not c.job.cancelled)
        for choice in self.running:
            if choice.job.cancelled:
                choice.finished = True
                self.engine.release(choice.seq)
        self.running = [c for c in self.running if not c.finished]

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.running) < self.max_batch:
                if not self.engine.admit(self.waiting[0].seq):
                    break
                self.running.append(self.waiting.popleft())

    def _abort_all(self) -> None:
        with self.lock:
            left = list(self.running) + list(self.waiting)
            self.waiting.clear()
        by_job: dict[Job, list[Update]] = {}
        for choice in left:
            if choice.seq.blocks:
                self.engine.release(choice.seq)
            choice.finished = True
            by_job.setdefault(choice.job, []).append(Update(choice.index, finish="abort"))
        self.running = []
        for job, updates in by_job.items():
            job.post(updates)
