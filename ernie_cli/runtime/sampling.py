"""Turning one position's logits into the next token.

Order, as in llama.cpp and transformers: penalties, then temperature, then top-k, top-p and min-p
filters, then a draw. temperature 0 is greedy (argmax of the penalised logits). The draw uses the
exponential trick (argmax of p / Exp(1)) with a seeded generator on the logits' device: it needs no
host sync, and the same seed, device and dtype give the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ernie_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

# torch.Generator.manual_seed takes any 64-bit value; negative ones alias positive ones, so they are refused.
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' rule, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's rule, over the output only
    frequency_penalty: float = 0.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Refuse values the sampler cannot use. Needs no torch, so options are checked before anything loads."""
        floats = dict(temperature=self.temperature, top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        for name, value in floats.items():
            if not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {value}.")
        checks = [
            (self.seed is None or 0 <= self.seed <= SEED_MAX, f"--seed must be between 0 and {SEED_MAX}"),
            (self.temperature >= 0, "--temperature must be >= 0"),
            (self.top_k >= 0, "--top-k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (0 <= self.min_p < 1, "--min-p must be in [0, 1)"),
            (self.repetition_penalty > 0, "--repetition-penalty must be > 0 (1 turns it off)"),
            (-2 <= self.presence_penalty <= 2, "--presence-penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "--frequency-penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message + ".")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    # torch is imported here and below rather than at the top: see SamplingParams.validate.
    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device):
        import torch

        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        # Counts of tokens seen so far: prompt (for the repetition penalty) and output (presence/frequency).
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self._one = torch.ones(1, dtype=torch.float32, device=device)

    def observe_prompt(self, ids: torch.Tensor) -> None:
        self.seen[ids] = True

    def observe(self, token: torch.Tensor) -> None:
        # By a one-element index, never a 0-d one: torch reads a 0-d index back to the host, which
        # on CUDA made every token wait there for the step before the next step could be queued.
        at = token.reshape(1)
        self.seen.index_fill_(0, at, True)
        self.output_counts.index_add_(0, at, self._one)

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        p = self.params
        if p.repetition_penalty != 1.0:
            scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, scaled, logits)
        if p.presence_penalty or p.frequency_penalty:
            logits = logits - p.presence_penalty * (self.output_counts > 0) - p.frequency_penalty * self.output_counts
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [V] float32 -> a 0-d int64 token id on the same device."""
        import torch

        p = self.params
        logits = self.penalise(logits.float())
        if p.greedy:
            return logits.argmax()
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        noise = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / noise).argmax()
