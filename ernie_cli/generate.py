"""The token loop: one prefill over the prompt, then one forward per new token through the KV cache."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ernie_cli.model import ErnieForCausalLM
from ernie_cli.sampling import Sampler


def use_compile(option: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on CUDA, where a CUDA graph removes ~1000 kernel launches
    per token; on the CPU the compile time is not won back."""
    if option == "auto":
        return device.type == "cuda"
    return option == "on"


def _compile_settings() -> None:
    # Persist Inductor's caches across runs, so a second `ernie complete` does not recompile.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "ernie" / "inductor"))
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    inductor.assert_indirect_indexing = False  # the expert gather is bounded by top-k; skip device asserts


class Decoder:
    """One-token steps through the KV cache: eager, or one CUDA graph per step when compiled."""

    def __init__(self, model: ErnieForCausalLM, compile: bool = False):
        self.model = model
        self.compiled = compile
        if compile:
            _compile_settings()
            model.fuse_projections()  # fewer launches in the graph; eager steps use the same modules
            # CUDA: the step as one CUDA graph; the CPU has none, and there compiling fuses the small ops.
            mode = "reduce-overhead" if model.device.type == "cuda" else "default"
            self.step = torch.compile(model.decode_step, mode=mode, fullgraph=True)
            self.pos = torch.zeros(1, dtype=torch.long, device=model.device)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [B, 1] at position pos -> logits [B, V]."""
        if not self.compiled:
            return self.model(tokens, pos)[:, -1]
        self.pos.fill_(pos)
        return self.step(tokens, self.pos).clone()  # the graph's output buffer is reused by the next replay


@dataclass
class Step:
    token: int
    logprob: float | None = None  # of the chosen token, under the model's unfiltered distribution
    top: list[tuple[int, float]] | None = None  # the n most likely [id, logprob] pairs


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    decoded_tokens: int = 0  # tokens produced by decode steps (the first comes from the prefill)
    _t0: float = field(default=0.0, repr=False)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decoded_tokens / self.decode_s if self.decode_s else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """
    device = model.device
    decoder = decoder or Decoder(model)
    timings = timings if timings is not None else Timings()
    timings.prompt_tokens = len(prompt)
    model.setup_cache(1, len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    sampler.observe_prompt(ids[0])

    start = time.perf_counter()
    logits = model(ids, 0)[0, -1].float()
    pos = len(prompt)
    for i in range(max_new_tokens):
        token = sampler(logits)
        sampler.observe(token)
        step = Step(int(token))  # the one host sync per token: the caller needs the id to print it
        if logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            step.logprob = float(lp[step.token])
            if logprobs > 0:
                values, idx = torch.topk(lp, logprobs)
                step.top = list(zip(idx.tolist(), values.tolist()))
        now = time.perf_counter()
        if i == 0:
            timings.prefill_s = now - start
        else:
            timings.decode_s += now - start
            timings.decoded_tokens += 1
        yield step
        if step.token in stop_ids or i == max_new_tokens - 1:
            return
        start = time.perf_counter()
        logits = decoder(token.view(1, 1), pos)[0].float()
        pos += 1
