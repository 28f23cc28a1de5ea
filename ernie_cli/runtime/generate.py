"""The token loop: one prefill over the prompt, then one step per new token through the decoder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ernie_cli.errors import ErnieError
from ernie_cli.model.ernie import ErnieForCausalLM
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.runtime.sampling import Sampler


@dataclass
class Step:
    token: int
    logprob: float | None = None  # of the chosen token, under the model's unfiltered distribution
    top: list[tuple[int, float]] | None = None  # the n most likely [id, logprob] pairs


@dataclass
class Timings:
    """prefill_s: the prompt's forward, up to the first token. first_step_s: the first decode step,
    which also builds what later steps replay (a CUDA graph's capture, Triton's first launches).
    decode_s and decoded_tokens: the steps after it, the steady rate."""

    prefill_s: float = 0.0
    first_step_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    decoded_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decoded_tokens / self.decode_s if self.decode_s else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _HostToken:
    """A token id on its way to the host. On CUDA the copy goes to pinned memory behind an event, so
    reading it waits only for the work queued before it, not for the next step queued after."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffer = torch.empty(1, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def send(self, token: torch.Tensor) -> None:
        self.buffer.copy_(token.view(1), non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()

    def receive(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.buffer[0])


@torch.inference_mode()
def generate(
    model: ErnieForCausalLM,
    prompt: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    logprobs: int | None = None,
    timings: Timings | None = None,
    decoder: Decoder | None = None,
) -> Iterator[Step]:
    """Yield generated tokens one by one; stops after a stop id (which is yielded) or max_new_tokens.

    The caller may stop iterating at any point (a stop string matched, the pipe closed).

    From the second token on, each step is queued before the host waits for the token it follows
    from: the token goes from sampling into the next step on the device, so the GPU computes token
    i + 1 while the host reads, prints and checks token i. A stop found on the host leaves one step
    computed for nothing.
    """
    device = model.device
    decoder = decoder or Decoder(model)
    timings = timings if timings is not None else Timings()
    timings.prompt_tokens = len(prompt)
    decoder.reserve(len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    sampler.observe_prompt(ids[0])
    host = _HostToken(device)

    start = time.perf_counter()
    logits = decoder.prefill(ids)[0].float()
    pos = len(prompt)
    for i in range(max_new_tokens):
        # NaN or Inf logits (damaged weights, a dtype's range overflowed) would still yield a token
        # (<unk>, over and over); -1 marks them instead, read with the token in the copy it already costs.
        token = torch.where(torch.isfinite(logits).all(), sampler(logits), -1)
        host.send(token)
        token = token.clamp(min=0)  # what the device goes on with, until the host sees the -1 and stops
        sampler.observe(token)
        step = Step(-1)
        if logprobs is not None:  # read back now, before the next step is queued behind them
            lp = torch.log_softmax(logits, dim=-1)
            step.logprob = float(lp[token])
            if logprobs > 0:
                values, idx = torch.topk(lp, logprobs)
                step.top = list(zip(idx.tolist(), values.tolist()))
        more = i < max_new_tokens - 1
        if i > 0 and more:
            logits = decoder(token.view(1, 1), pos)[0].float()
            pos += 1
        step.token = host.receive()
        if step.token < 0:
            where = "for the prompt" if i == 0 else f"at generated token {i + 1}"
            raise ErnieError(
                f"the model's logits are not finite (NaN or Inf) {where}: its weights are damaged or overflow "
                "this dtype; download the model again, or try --dtype float32."
            )
        now = time.perf_counter()
        if i == 0:
            timings.prefill_s = now - start
        elif i == 1:
            timings.first_step_s = now - start
        else:
            timings.decode_s += now - start
            timings.decoded_tokens += 1
        start = now  # the host's time with the token overlaps the next step, so it counts
        if i == 0 and more:
            # The first token is read before the first step is queued, so it prints at once; that
            # step (which on CUDA captures the graph the others replay) counts as first_step_s.
            logits = decoder(token.view(1, 1), pos)[0].float()
            pos += 1
        yield step
        if step.token in stop_ids:
            return
